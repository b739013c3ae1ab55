"""The names the model code had when Qwen3 was its only family, kept so callers keep working.

`decoder.py` is the model now (Qwen3, Qwen2/Qwen2.5, Llama 3.x); a `Qwen3Config` built without a
`model_type` is still a Qwen3.
"""

from slipstream.models.config import ModelConfig as Qwen3Config
from slipstream.models.decoder import MLP as Qwen3MLP
from slipstream.models.decoder import Attention, RMSNorm, causal_attention
from slipstream.models.decoder import CausalLM as Qwen3ForCausalLM
from slipstream.models.decoder import DecoderLayer as Qwen3DecoderLayer
from slipstream.models.decoder import DecoderModel as Qwen3Model
from slipstream.models.decoder import SelfAttention as Qwen3Attention
from slipstream.models.rope import apply_rope, rope_cos_sin

__all__ = [
    "Attention",
    "Qwen3Attention",
    "Qwen3Config",
    "Qwen3DecoderLayer",
    "Qwen3ForCausalLM",
    "Qwen3MLP",
    "Qwen3Model",
    "RMSNorm",
    "apply_rope",
    "causal_attention",
    "rope_cos_sin",
]
