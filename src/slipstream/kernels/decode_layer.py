"""The glue between a decoder layer's GEMMs in a decode step, three Triton kernels (CUDA only).

Why. One decode token through a Qwen3 layer, written in plain PyTorch, is ~40 small kernels
around the four matrix products: RMSNorm's fp32 cast, norm, cast back and weight multiply; the
q/k head norms; RoPE's split, negate, concatenate, two multiplies and an add, for q and for k;
the key/value index writes into the cache; the residual adds. Inside a CUDA graph each still
costs a few microseconds, so at batch 1 the step is launch-bound (~4.7 ms where the weights need
0.28 ms), and at batch 256 they move the activations a dozen times. Here each stretch between two
GEMMs is one kernel:

- `add_rmsnorm`: residual add (in place) + RMSNorm, optionally also the per-token FP8
  quantization of the normed row that the next FP8 GEMM needs (one launch instead of two);
- `qk_norm_rope_kv`: from the fused q|k|v projection (biases already added by its GEMM), the
  q/k head RMSNorms (Qwen3; Qwen2 and Llama have none: a constexpr switch skips them), RoPE on q
  and k, the new key and value written into their cache slot, and q handed to attention;
- `silu_mul`: SiLU(gate) * up from the fused gate|up projection (optionally FP8-quantized).

Same function as `slipstream.models.decoder`, down to the roundings: every place where the PyTorch
model rounds to the model's dtype (the norm before its weight, each RoPE product, SiLU before the
multiply) rounds here too, so bf16 results differ only where an fp32 `exp`/`rsqrt` differs in its
last bit. `tests/test_engine_gpu.py` pins the fused step against the model's own forward.
"""

from __future__ import annotations

import torch

from slipstream.kernels.fp8_linear import new_row_scales
from slipstream.quant import FP8_DTYPE

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model's own forward runs instead
    triton = None


def available(device: torch.device, head_dim: int) -> bool:
    return triton is not None and device.type == "cuda" and head_dim in (16, 32, 64, 128, 256)


if triton is not None:

    @triton.jit
    def _store_quantized_row(
        h, q_ptr, s_ptr, row, N, M, offs, mask, GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr
    ):
        # per-token e4m3 of the row just computed, exactly fp8_linear.quantize_rows, its scale
        # stored once per 128-wide group, group-major ([GROUPS, M]: `fp8_linear.new_row_scales`)
        hf = h.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(hf), axis=0), 1e-12) / 448.0
        q = tl.minimum(tl.maximum(hf / scale, -448.0), 448.0)
        tl.store(q_ptr + row * N + offs, q.to(tl.float8e4nv), mask=mask)
        groups = tl.arange(0, GROUPS_P2)
        tl.store(s_ptr + groups * M + row, tl.zeros_like(groups.to(tl.float32)) + scale, mask=groups < GROUPS)

    @triton.jit
    def _add_rmsnorm_kernel(
        x_ptr, r_ptr, w_ptr, out_ptr, q_ptr, s_ptr, N, M, eps,
        HAS_RES: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr,
        GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        dt = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0)
        if HAS_RES:  # x += r, rounded to the model's dtype as the PyTorch add is
            r = tl.load(r_ptr + row * N + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)
            tl.store(x_ptr + row * N + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
        # weight * rms_norm(x.float()).to(dtype): round the normed row, then the product
        y = (xf * rstd).to(dt).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = (w * y).to(dt)
        if QUANT:
            _store_quantized_row(h, q_ptr, s_ptr, row, N, M, offs, mask, GROUPS, GROUPS_P2)
        else:
            tl.store(out_ptr + row * N + offs, h, mask=mask)

    @triton.jit
    def _qk_norm_rope_kv_kernel(
        qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_ptr, v_ptr, num_slots,
        stride_qkv, stride_cs, stride_kb, stride_kh, stride_kn, eps,
        H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, KV_FP8: tl.constexpr,
        QK_NORM: tl.constexpr,
    ):  # fmt: skip
        # One program per token, a [heads, D/2] tile per half: rows 0..H-1 are the query heads,
        # then the KV heads' keys, then their values (the fused projection's column order). Row b
        # writes cache slot b mod num_slots (a verify's rows are token-major: row j*n + s is slot s).
        b = tl.program_id(0).to(tl.int64)
        slot = b % num_slots
        j = tl.arange(0, BLOCK_H)[:, None]
        half = tl.arange(0, D // 2)[None, :]
        is_q = j < H
        is_k = (j >= H) & (j < H + HKV)
        is_v = (j >= H + HKV) & (j < H + 2 * HKV)
        dt = q_out_ptr.dtype.element_ty
        src = qkv_ptr + b * stride_qkv + j * D
        x1 = tl.load(src + half, mask=j < H + 2 * HKV, other=0.0)
        x2 = tl.load(src + D // 2 + half, mask=j < H + 2 * HKV, other=0.0)
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        if QK_NORM:
            rstd = tl.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / D + eps)[:, None]
            w1 = tl.where(is_q, tl.load(qw_ptr + half), tl.load(kw_ptr + half)).to(tl.float32)
            w2 = tl.where(is_q, tl.load(qw_ptr + D // 2 + half), tl.load(kw_ptr + D // 2 + half))
            w2 = w2.to(tl.float32)
            # weight * rms_norm(x.float()).to(dtype), then rotate-half RoPE, x * cos + cat(-x2, x1) * sin,
            # each product rounded to the model's dtype like PyTorch's
            y1 = (w1 * (f1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            y2 = (w2 * (f2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        else:  # Qwen2, Llama: q and k reach RoPE as the projection left them (already in dt)
            y1 = f1
            y2 = f2
        c = tl.load(cos_ptr + b * stride_cs + half).to(tl.float32)
        s = tl.load(sin_ptr + b * stride_cs + half).to(tl.float32)
        o1 = ((y1 * c).to(dt).to(tl.float32) + (-y2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((y2 * c).to(dt).to(tl.float32) + (y1 * s).to(dt).to(tl.float32)).to(dt)
        q_dst = q_out_ptr + (b * H + j) * D
        tl.store(q_dst + half, o1, mask=is_q)
        tl.store(q_dst + D // 2 + half, o2, mask=is_q)
        pos = tl.load(pos_ptr + b).to(tl.int64)
        k1, k2, v1, v2 = o1.to(tl.float32), o2.to(tl.float32), f1, f2
        if KV_FP8:  # e4m3 with scale 1 (SGLang's default without checkpoint scales): saturate
            k1, k2 = tl.clamp(k1, -448.0, 448.0), tl.clamp(k2, -448.0, 448.0)
            v1, v2 = tl.clamp(v1, -448.0, 448.0), tl.clamp(v2, -448.0, 448.0)
        kv_ty = k_ptr.dtype.element_ty
        k_dst = k_ptr + slot * stride_kb + (j - H) * stride_kh + pos * stride_kn
        tl.store(k_dst + half, k1.to(kv_ty), mask=is_k)
        tl.store(k_dst + D // 2 + half, k2.to(kv_ty), mask=is_k)
        v_dst = v_ptr + slot * stride_kb + (j - H - HKV) * stride_kh + pos * stride_kn
        tl.store(v_dst + half, v1.to(kv_ty), mask=is_v)
        tl.store(v_dst + D // 2 + half, v2.to(kv_ty), mask=is_v)

    @triton.jit
    def _silu_mul_kernel(
        gu_ptr, out_ptr, q_ptr, s_ptr, N, M,
        QUANT: tl.constexpr, BLOCK: tl.constexpr, GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        dt = gu_ptr.dtype.element_ty
        g = tl.load(gu_ptr + row * 2 * N + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * N + N + offs, mask=mask, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # F.silu rounds before the multiply
        h = (a * u).to(dt)
        if QUANT:  # one block holds the whole row here (the wrapper says so)
            _store_quantized_row(h, q_ptr, s_ptr, row, N, M, offs, mask, GROUPS, GROUPS_P2)
        else:
            tl.store(out_ptr + row * N + offs, h, mask=mask)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, quant: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] (contiguous) += residual (in place, when given); RMSNorm(x) * weight.

    Returns the normed rows, or with `quant` their per-token e4m3 quantization (q, scale [M, 1];
    laid out for cuBLAS too where the next GEMM goes there: `fp8_linear.new_row_scales`)."""
    m, n = x.shape
    block = triton.next_power_of_2(n)
    groups = 1
    if quant:
        q = torch.empty((m, n), dtype=FP8_DTYPE, device=x.device)
        scale, groups = new_row_scales(m, n, x.device)
        out = x  # unused
    else:
        out = torch.empty_like(x)
        q = scale = x  # unused
    r = residual if residual is not None else x
    _add_rmsnorm_kernel[(m,)](
        x, r, weight, out, q, scale, n, m, eps,
        HAS_RES=residual is not None, QUANT=quant, BLOCK=block,
        GROUPS=groups, GROUPS_P2=triton.next_power_of_2(groups), num_warps=_warps(block),
    )  # fmt: skip
    return (q, scale) if quant else out


def qk_norm_rope_kv(
    qkv: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    eps: float,
    num_slots: int | None = None,
) -> torch.Tensor:
    """qkv [B, (H + 2 Hkv) D] -> q [B, H, D] normed and rotated; the rotated key and the value of
    row b land at position positions[b] of cache slot b mod num_slots (default B: slot b;
    k/v_cache [>=min(B, num_slots), Hkv, L, D], one layer). cos/sin [B, D] (the halves duplicated,
    as `rope_cos_sin` gives them). q/k_weight: the head RMSNorm weights [D], or None for a family
    without them (q and k are then only rotated)."""
    b = qkv.shape[0]
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    q = torch.empty((b, num_heads, d), dtype=qkv.dtype, device=qkv.device)
    block_h = triton.next_power_of_2(num_heads + 2 * hkv)
    qk_norm = q_weight is not None
    _qk_norm_rope_kv_kernel[(b,)](
        qkv, q_weight if qk_norm else qkv, k_weight if qk_norm else qkv,  # unread without norms
        cos, sin, positions, q, k_cache, v_cache, num_slots or b,
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), eps,
        H=num_heads, HKV=hkv, D=d, BLOCK_H=block_h, KV_FP8=k_cache.dtype == FP8_DTYPE, QK_NORM=qk_norm,
        num_warps=_warps(block_h * d // 2),
    )  # fmt: skip
    return q


def silu_mul(gate_up: torch.Tensor, quant: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """gate_up [M, 2N] (gate | up) -> SiLU(gate) * up [M, N], or its per-token e4m3 (q, scale)."""
    m, n2 = gate_up.shape
    n = n2 // 2
    groups = 1
    if quant:
        block = triton.next_power_of_2(n)
        q = torch.empty((m, n), dtype=FP8_DTYPE, device=gate_up.device)
        scale, groups = new_row_scales(m, n, gate_up.device)
        out = gate_up
    else:
        block = min(1024, triton.next_power_of_2(n))
        out = torch.empty((m, n), dtype=gate_up.dtype, device=gate_up.device)
        q = scale = gate_up
    _silu_mul_kernel[(m, triton.cdiv(n, block))](
        gate_up, out, q, scale, n, m, QUANT=quant, BLOCK=block,
        GROUPS=groups, GROUPS_P2=triton.next_power_of_2(groups), num_warps=_warps(block),
    )  # fmt: skip
    return (q, scale) if quant else out
