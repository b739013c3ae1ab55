"""Model code shared by the native rollout engine and the PyTorch trainer (architecture only).

One decoder (`decoder.py`) for the families `config.FAMILIES` names (Qwen3, Qwen2/Qwen2.5,
Llama 3.x, Qwen3-MoE, whose sparse block and routing side channel are `moe.py`), RoPE and its scaled kinds (`rope.py`), Hugging Face checkpoints in and out (`hf.py`).
The `Qwen3*` names are the same classes under the names they had when Qwen3 was the only family.
"""

from slipstream.models.config import FAMILIES, ModelConfig
from slipstream.models.decoder import Attention, CausalLM, DecoderModel
from slipstream.models.hf import init_model, load_config, load_model, load_tokenizer, save_model
from slipstream.models.moe import Routing, expert_load, load_balancing_loss
from slipstream.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

__all__ = [
    "FAMILIES",
    "Attention",
    "CausalLM",
    "DecoderModel",
    "ModelConfig",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Qwen3Model",
    "Routing",
    "expert_load",
    "init_model",
    "load_balancing_loss",
    "load_config",
    "load_model",
    "load_tokenizer",
    "save_model",
]
