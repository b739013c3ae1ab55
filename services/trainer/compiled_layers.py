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

with `before` and `after` the model's own `Qwen3DecoderLayer.before_attention` /
`after_attention` (its forward is exactly the two around the attention call), compiled once
(dynamic shapes) and shared by all layers (parameters are graph inputs);
tests/test_packing.py pins the split forward to the model's own, bit for bit, uncompiled on CPU
(tests/test_routing_replay.py: with an MoE routing replayed and captured).
"""

from __future__ import annotations

import functools

import torch

from slipstream.models.qwen3 import Qwen3DecoderLayer


@functools.cache
def _compiled():
    return (
        torch.compile(Qwen3DecoderLayer.before_attention, dynamic=True),
        torch.compile(Qwen3DecoderLayer.after_attention, dynamic=True),
    )


def split_layers(model: torch.nn.Module, compile: bool = True) -> None:
    """Replace each decoder layer's forward by before -> attention -> after (compiled unless told not)."""
    plain = (Qwen3DecoderLayer.before_attention, Qwen3DecoderLayer.after_attention)
    before, after = _compiled() if compile else plain
    for layer in model.model.layers:

        def forward(x, cos, sin, attention, routing=None, _layer=layer):
            q, k, v = before(_layer, x, cos, sin)
            out = attention(_layer.self_attn.layer_idx, q, k, v)
            # An MoE layer's routing (replay in, capture out: routing.py) goes through `after`.
            return after(_layer, x, out) if routing is None else after(_layer, x, out, routing)

        layer.forward = forward
