"""Qwen3 dense decoder in plain PyTorch, with Hugging Face parameter names.

This is the one model code the native rollout engine and the PyTorch trainer share: owning it is
what lets rollout log-probs and trainer log-probs come from the same arithmetic. It says what the
model is and nothing about how it runs: no parallelism, no FP8, no kernels (those wrap it).

The numerics follow `transformers`' Qwen3 on purpose, down to where the casts happen (RMSNorm
normalises in fp32 and casts back before the weight; RoPE angles are computed in fp32), so a
checkpoint gives the same logits here and there (`tests/test_model.py` pins it).

Attention is pluggable, because that is the only place where training and cached generation
differ. The trainer calls `model(input_ids)` and gets plain causal attention over the batch. The
engine passes positions and an `attention` callable that writes the new keys/values into its KV
cache and attends over the cached prefix; the model never sees the cache layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# attention(layer_idx, q [B,H,T,D], k [B,Hkv,T,D], v [B,Hkv,T,D]) -> out [B,H,T,D]; q and k carry RoPE.
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Qwen3Config:
    """The architecture, spelled as Hugging Face's `config.json` spells it."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # False for every released Qwen3; kept so such checkpoints load
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Qwen3Config:
        """Read a Qwen3 `config.json` (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
        d = dict(d)
        model_type = d.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ValueError(f"model_type {model_type!r} is not supported (expected 'qwen3')")
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        d.pop("rope_scaling", None)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported (only plain RoPE)")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (expected 'silu')")
        theta = d.pop("rope_theta", None) or rope.get("rope_theta", cls.rope_theta)
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "rope_theta")}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        written_by_us = ("hidden_act", "attention_dropout", "use_sliding_window", "sliding_window")
        for derived in ("model_type", "architectures", "transformers_version", "layer_types", *written_by_us):
            d.pop(derived, None)
        return cls(rope_theta=float(theta), extra=d, **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` that `transformers` loads as its `Qwen3Config`."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            attention_dropout=0.0,
            use_sliding_window=False,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the order transformers uses (bf16 logits match).
        # F.rms_norm is one fused kernel where the backend has one (decode is launch-bound).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


@functools.cache
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # Computed on the CPU like transformers does, so the angles agree bit for bit; cached per
    # device because a host-to-device copy per forward is a sync the decode loop cannot afford.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv_freq.to(device)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B,T,head_dim] for integer positions [B,T] (angles in fp32, halves duplicated)."""
    freqs = positions[..., None].float() * _inv_freq(head_dim, theta, positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,H,T,D]; cos/sin [B,T,D] (rotate-half convention, as Hugging Face checkpoints expect)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def causal_attention(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal self-attention over the batch (the training path; right padding is harmless)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias)
        # Qwen3's addition over Qwen2: RMSNorm on each head's q and k, before RoPE.
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        return self.project_out(attention(self.layer_idx, *self.project_qkv(x, cos, sin)))

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,T,hidden] -> q [B,H,T,D], k and v [B,Hkv,T,D], q and k normed and rotated."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B,H,T,D] -> [B,T,hidden]."""
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        q, k, v = self.before_attention(x, cos, sin)
        return self.after_attention(x, attention(self.self_attn.layer_idx, q, k, v))

    # The layer on either side of its attention call: the trainer compiles these two pieces
    # (services/trainer/compiled_layers.py) and runs the attention it was given between them.
    def before_attention(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.project_qkv(self.input_layernorm(x), cos, sin)

    def after_attention(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.project_out(out)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """The decoder stack: token ids -> final-normed hidden states [B,T,H]."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention: Attention | None = None,
    ) -> torch.Tensor:
        """input_ids [B,T]; positions [B,T] (default 0..T-1); attention (default: causal, no cache)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        attention = attention or causal_attention
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """Decoder plus LM head; `model(input_ids) -> logits [B,T,V]`, `model.model(...) -> hidden`."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (re-run after assigning)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention: Attention | None = None,
        head: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> Any:
        """Logits, or `head(hidden, lm_head_weight)` when given.

        `head` lets the trainer turn hidden states into per-token log-probs chunk by chunk
        without materialising full-vocabulary logits, inside this forward: under FSDP2 the
        LM-head weight is only gathered (unsharded) while the root module's forward runs.
        """
        hidden = self.model(input_ids, positions, attention)
        if head is not None:
            return head(hidden, self.lm_head.weight)
        return self.lm_head(hidden)
