"""`--torch-compile` in the trainer: each decoder layer as two compiled graphs around attention.

A decoder layer is glue around seven GEMMs and one attention call: two RMSNorms, q/k head
norms, RoPE (a cat and four multiplies), transposes and residual adds, each its own kernel in
eager mode, forward and backward, for 28 layers and every micro-batch. On the H200 that glue
(plus the launches it costs) was most of a step once the autocast casts were gone.

Compiling the whole layer is out: the attention is a callable the caller passes in (a packed
row's FlashAttention varlen closure, made fresh per micro-batch), which Dynamo would guard on.
So the layer's forward is replaced, on the trainer's own copy of the model, by

    q, k, v = before(layer, x, cos, sin)     # input norm, q/k/v projections, head norms, RoPE
    out     = attention(layer_idx, q, k, v)  # eager: whatever the caller passed
    x       = after(layer, x, out)           # o_proj + residual, post norm, MLP + residual

with `before` and `after` compiled once (dynamic shapes) and shared by all layers (parameters
are graph inputs). Both spell the arithmetic of `Qwen3DecoderLayer.forward` and
`Qwen3Attention.forward` with the layer's own modules and `apply_rope`;
tests/test_packing.py pins the split forward to the model's own, bit for bit, uncompiled on CPU.
The model file itself is untouched (the engine shares it).
"""

from __future__ import annotations

import functools

import torch

from slipstream.models.qwen3 import Qwen3DecoderLayer, apply_rope


def before_attention(layer: Qwen3DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    b, t, _ = h.shape
    q = attn.q_norm(attn.q_proj(h).view(b, t, attn.num_heads, attn.head_dim)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim)).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def after_attention(layer: Qwen3DecoderLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    attn = layer.self_attn
    b, t, _ = x.shape
    x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim))
    return x + layer.mlp(layer.post_attention_layernorm(x))


@functools.cache
def _compiled():
    return torch.compile(before_attention, dynamic=True), torch.compile(after_attention, dynamic=True)


def split_layers(model: torch.nn.Module, compile: bool = True) -> None:
    """Replace each decoder layer's forward by before -> attention -> after (compiled unless told not)."""
    before, after = _compiled() if compile else (before_attention, after_attention)
    for layer in model.model.layers:

        def forward(x, cos, sin, attention, _layer=layer):
            q, k, v = before(_layer, x, cos, sin)
            return after(_layer, x, attention(_layer.self_attn.layer_idx, q, k, v))

        layer.forward = forward
