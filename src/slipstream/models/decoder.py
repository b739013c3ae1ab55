"""The decoder (Qwen3, Qwen2/Qwen2.5, Llama 3.x, Qwen3-MoE) in plain PyTorch, with Hugging Face names.

This is the one model code the native rollout engine and the PyTorch trainer share: owning it is
what lets rollout log-probs and trainer log-probs come from the same arithmetic. It says what the
model is and nothing about how it runs: no parallelism, no FP8, no kernels (those wrap it). The
families differ only in the switches `config.Family` names (q/k head norms, biases); RoPE and its
scaled kinds live in `rope.py`. A Qwen3-MoE layer's MLP is `moe.SparseMoE`; an optional `Routing`
passed to the forward replays given expert ids and captures the chosen ones (`moe.py` says how).

The numerics follow `transformers`' models on purpose, down to where the casts happen (RMSNorm
normalises in fp32 and casts back before the weight; RoPE angles are computed in fp32), so a
checkpoint gives the same logits here and there (`tests/test_model.py`,
`tests/test_model_families.py` pin it).

Attention is pluggable, because that is the only place where training and cached generation
differ. The trainer calls `model(input_ids)` and gets plain causal attention over the batch. The
engine passes positions and an `attention` callable that writes the new keys/values into its KV
cache and attends over the cached prefix; the model never sees the cache layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.models.config import ModelConfig
from slipstream.models.moe import Routing, SparseMoE
from slipstream.models.rope import apply_rope, rope_cos_sin

# attention(layer_idx, q [B,H,T,D], k [B,Hkv,T,D], v [B,Hkv,T,D]) -> out [B,H,T,D]; q and k carry RoPE.
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back, then scale: the order transformers uses (bf16 logits match).
    F.rms_norm is one fused kernel where the backend has one (decode is launch-bound)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def causal_attention(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal self-attention over the batch (the training path; right padding is harmless)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, d, qkv_bias = config.hidden_size, config.head_dim, config.qkv_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.attention_bias)
        # Qwen3's addition over Qwen2: RMSNorm on each head's q and k, before RoPE.
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.family.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.family.qk_norm else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        return self.project_out(attention(self.layer_idx, *self.project_qkv(x, cos, sin)))

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,T,hidden] -> q [B,H,T,D], k and v [B,Hkv,T,D], q and k normed (Qwen3) and rotated."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B,H,T,D] -> [B,T,hidden]."""
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config, layer_idx)
        moe_layers = config.moe_layers
        self.mlp = SparseMoE(config, moe_layers.index(layer_idx)) if layer_idx in moe_layers else MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: Attention,
        routing: Routing | None = None,
    ) -> torch.Tensor:
        q, k, v = self.before_attention(x, cos, sin)
        return self.after_attention(x, attention(self.self_attn.layer_idx, q, k, v), routing)

    # The layer on either side of its attention call: the trainer compiles these two pieces
    # (services/trainer/compiled_layers.py) and runs the attention it was given between them.
    def before_attention(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.project_qkv(self.input_layernorm(x), cos, sin)

    def after_attention(
        self, x: torch.Tensor, out: torch.Tensor, routing: Routing | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn.project_out(out)
        return x + self.feed_forward(self.post_attention_layernorm(x), routing)

    def feed_forward(self, h: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """The MLP, or the MoE block with its routing."""
        return self.mlp(h, routing) if isinstance(self.mlp, SparseMoE) else self.mlp(h)


class DecoderModel(nn.Module):
    """The decoder stack: token ids -> final-normed hidden states [B,T,H]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention: Attention | None = None,
        routing: Routing | None = None,
    ) -> torch.Tensor:
        """input_ids [B,T]; positions [B,T] (default 0..T-1); attention (default: causal, no cache);
        routing: MoE replay in / capture out (`moe.Routing`; ignored by dense models)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.rope, x.dtype)
        attention = attention or causal_attention
        # Routing is passed only when given: the trainer's --torch-compile replaces each layer's
        # forward with a four-argument one (services/trainer/compiled_layers.py).
        extra = {} if routing is None else {"routing": routing}
        for layer in self.layers:
            x = layer(x, cos, sin, attention, **extra)
        return self.norm(x)


class CausalLM(nn.Module):
    """Decoder plus LM head; `model(input_ids) -> logits [B,T,V]`, `model.model(...) -> hidden`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
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
        routing: Routing | None = None,
    ) -> Any:
        """Logits, or `head(hidden, lm_head_weight)` when given.

        `head` lets the trainer turn hidden states into per-token log-probs chunk by chunk
        without materialising full-vocabulary logits, inside this forward: under FSDP2 the
        LM-head weight is only gathered (unsharded) while the root module's forward runs.
        """
        hidden = self.model(input_ids, positions, attention, routing)
        if head is not None:
            return head(hidden, self.lm_head.weight)
        return self.lm_head(hidden)


def init_weights_(module: nn.Module, seed: int) -> None:
    """Hugging Face's initialisation, reproducible: normal std 0.02 for matrices, ones for norms,
    zeros for biases, drawn in parameter order from one generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
