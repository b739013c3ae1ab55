"""Model code shared by the native rollout engine and the PyTorch trainer (architecture only)."""

from slipstream.models.hf import init_model, load_config, load_model, load_tokenizer, save_model
from slipstream.models.qwen3 import Attention, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

__all__ = [
    "Attention",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Qwen3Model",
    "init_model",
    "load_config",
    "load_model",
    "load_tokenizer",
    "save_model",
]
