"""Checkpoints of each model family as `transformers` writes them, for the family tests.

Built from transformers' own config and model classes (so config.json carries what real
checkpoints carry), with norms drawn away from one and biases away from zero: a norm or bias in
the wrong place is invisible at its initial value. RoPE scalings use a short original context (32)
so that test sequences run past it, where the scalings differ from plain RoPE the most.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 64

HF = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
}
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    # wavelengths 6.3 .. 1.9e4 (head_dim 16) against 32/4 and 32/1: high, medium and low all occur
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


def shape(family: str) -> dict:
    """A tiny shape in config.json's keys. Qwen2's config has no head_dim (derived: 16); Llama's
    explicit one differs from hidden/heads. Qwen3-MoE: 8 experts, top-2, renormalised; layers 0
    and 2 sparse, layer 1 a dense MLP (`mlp_only_layers`)."""
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return kw | {"qwen3": {"head_dim": 16}, "qwen2": {}, "llama": {"head_dim": 8}, "qwen3_moe": MOE}[family]


MOE = dict(
    head_dim=16,
    num_hidden_layers=3,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
)


def randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def save_hf_model(family: str, path: Path, rope: str = "default", seed: int = 3, **config):
    """transformers' model of `family` (random, eval mode), saved to `path` with save_pretrained.

    `config` overrides the tiny shape or sets other config keys (tie_word_embeddings, biases)."""
    config_cls, model_cls = HF[family]
    rope_parameters = {"rope_theta": 10000.0, **(ROPES[rope] or {"rope_type": "default"})}
    hf_config = config_cls(**shape(family) | {"rope_parameters": rope_parameters} | config)
    torch.manual_seed(seed)
    model = model_cls(hf_config).eval()
    randomise(model, seed + 1)
    model.save_pretrained(path)
    return model
