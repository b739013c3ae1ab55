"""The decode forward on a GPU in seven launches a layer: fused projections and fused glue.

Why. The model's own forward (`slipstream.models.decoder`) says what the model is and is what
the trainer runs; for one new token per sequence it is ~40 kernels a layer, most of them tiny glue
(casts, RoPE's pieces, index writes), and a decode step is launch- and glue-bound (see
`kernels/decode_layer.py`). This is the same function for that one case, written for the GPU:

    add+RMSNorm -> [q|k|v] GEMM -> q/k norm + RoPE + KV write -> decode attention -> o GEMM
    -> add+RMSNorm -> [gate|up] GEMM -> SiLU*up -> down GEMM          (then the next layer's add)

Every family runs it: the q/k norm is Qwen3's and skipped for Qwen2 and Llama (a constexpr in the
kernel), and biases (Qwen2's q/k/v, Llama's optional ones) are concatenated like the weights and
added by the GEMM, as `nn.Linear` adds them.

The projections that read the same input are one GEMM over concatenated weights: q|k|v and
gate|up. The concatenation happens once, here, and the model's parameters become views into it
(`param.data` rebinds to a slice), so the model keeps its Hugging Face names and shapes, the
prefill and every other caller see the same tensors, and `NativeEngine.load_weights`, which
copies into the parameters in place, updates the fused weights (and the CUDA graphs that read
them) with no extra step. FP8 layers (`Fp8Linear`) are fused the same way, e4m3 buffers and the
wire's block scales, and run on FP8 tensor cores (`kernels/fp8_gemm.py`); their activations are
quantized inside the norm and SiLU kernels, so only the attention output pays a separate quantize
launch. W4A16 layers (`W4A16Linear`: packed int4 + group scales) are fused alike and run
`kernels/w4a16.py`'s GEMM on the bf16 activations.

Used by the engine on CUDA for decode (graphed and eager) when `available`; prefill and the CPU
path run the model's forward. `tests/test_engine_gpu.py` pins it against that forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.kernels import attention as attention_kernel
from slipstream.kernels import decode_layer as kernels
from slipstream.kernels.fp8_linear import Fp8Linear, fp8_matmul, quantize_rows
from slipstream.kernels.w4a16 import W4A16Linear, w4a16_linear
from slipstream.models import CausalLM
from slipstream.models.rope import rope_cos_sin
from slipstream.services.rollout.engine.kv_cache import KVCache


def available(model: CausalLM) -> bool:
    cfg = model.config
    weight = model.model.embed_tokens.weight
    floating = weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return kernels.available(weight.device, cfg.head_dim) and floating


class _Fused:
    """One GEMM over the concatenation of `linears` (same input); the linears become views of it.

    bf16/fp32 `nn.Linear`s, FP8 layers (e4m3 + per-(row, 128-input) scales: `kernels/fp8_gemm.py`)
    and W4A16 layers (packed int4 + group scales: `kernels/w4a16.py`) concatenate the same way,
    along the output rows, scales and biases included."""

    def __init__(self, linears: list[nn.Module]) -> None:
        first = linears[0]
        self.kind = (
            "fp8" if isinstance(first, Fp8Linear) else "w4a16" if isinstance(first, W4A16Linear) else "dense"
        )
        self.fp8 = self.kind == "fp8"
        buffers = {"fp8": ("weight", "weight_scale"), "w4a16": ("packed", "scales")}.get(self.kind)
        has_bias = first.bias is not None
        self.bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
        if buffers is not None:
            self.weight, self.scale = (torch.cat([getattr(m, b) for m in linears]) for b in buffers)
        else:
            self.weight = torch.cat([m.weight.detach() for m in linears])
        start = 0
        for m in linears:
            rows = slice(start, start + m.out_features)
            if buffers is not None:  # buffers, reassigned to views
                setattr(m, buffers[0], self.weight[rows])
                setattr(m, buffers[1], self.scale[rows])
            else:
                m.weight.data = self.weight[rows]
            if has_bias:
                m.bias.data = self.bias[rows]
            start = rows.stop

    def __call__(
        self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        """x: activations [M, K], or (for FP8) already quantized (q, scale)."""
        if self.kind == "fp8":
            xq, xs = x if isinstance(x, tuple) else quantize_rows(x)
            return fp8_matmul(xq, xs, self.weight, self.scale, dtype, self.bias)
        if self.kind == "w4a16":
            return w4a16_linear(x, self.weight, self.scale, self.bias)
        return F.linear(x, self.weight, self.bias)


class FusedDecoder:
    def __init__(self, model: CausalLM) -> None:
        if not available(model):
            raise ValueError("FusedDecoder needs CUDA, Triton, a float model and a supported head_dim")
        self.model = model
        cfg = model.config
        self.eps, self.num_heads, self.head_dim = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.head_dim
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm.weight,
                    _Fused([attn.q_proj, attn.k_proj, attn.v_proj]),
                    attn.q_norm.weight if attn.q_norm is not None else None,  # Qwen3 only
                    attn.k_norm.weight if attn.k_norm is not None else None,
                    _Fused([attn.o_proj]),
                    layer.post_attention_layernorm.weight,
                    _Fused([mlp.gate_proj, mlp.up_proj]),
                    _Fused([mlp.down_proj]),
                )
            )
        self.fp8 = self.layers[0][1].fp8

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens [B], their KV positions [B] (slot b holds row b) -> final-normed hidden [B, hidden]."""
        cfg = self.model.config
        x = self.model.model.embed_tokens(tokens)
        dtype = x.dtype
        cos, sin = rope_cos_sin(positions, cfg.rope, dtype)
        lengths = positions + 1
        b = tokens.shape[0]
        residual = None  # what the previous block adds to x before the next norm
        for i, (in_norm, qkv, q_norm, k_norm, o, post_norm, gate_up, down) in enumerate(self.layers):
            h = kernels.add_rmsnorm(x, residual, in_norm, self.eps, quant=self.fp8)
            q = kernels.qk_norm_rope_kv(
                qkv(h, dtype), q_norm, k_norm, cos, sin, positions,
                cache.k[i], cache.v[i], self.num_heads, self.eps,
            )  # fmt: skip
            out = attention_kernel.decode_attention(
                q.view(b, self.num_heads, 1, self.head_dim), cache.k[i], cache.v[i], lengths
            )
            attn = o(out.view(b, -1), dtype)
            h = kernels.add_rmsnorm(x, attn, post_norm, self.eps, quant=self.fp8)
            residual = down(kernels.silu_mul(gate_up(h, dtype), quant=self.fp8), dtype)
        return kernels.add_rmsnorm(x, residual, self.model.model.norm.weight, self.eps)
