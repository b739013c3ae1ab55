"""Fused batch-invariant kernels for --true-on-policy-mode on CUDA: fewer launches, same contract.

The mode's forward ran the model's own ops one by one (~30 launches a layer at decode: RoPE alone
five a tensor), which on the GPU costs more than the arithmetic. Here the layer's glue runs in four
kernels, each computing a token's numbers from that token alone, so the trainer (T positions at
once) and the engine (one position a slot) still get the same bits: both call these same kernels
(`invariant.py`'s layer classes), which is what the bitwise promise needs, not equality with the
unfused ops.

- `multi_linear`: x @ [W0; W1; W2]^T in one launch (q|k|v, gate|up). Each program takes one
  BLOCK_N-column block of one weight and runs `invariant_gpu._tile` on it, the loop `linear`
  runs, split over K as `linear` would split one weight of all the rows (each weight's rows a
  whole number of BLOCK_N, else the layer calls `linear` per weight).
- `norm_rope`: the per-head RMSNorm of q and k (Qwen3; none for Llama/Qwen2) and RoPE's
  rotate-half, one program per (token, head), both tensors in one launch, written in the
  [B, H, T, D] layout attention reads. Rounded to the activation dtype where the model's ops round
  (normalise in fp32, round, scale, round; x*cos and rotated*sin rounded, then their sum).
- `add_rms_norm`: the residual add and the next RMSNorm, one program per row: the new residual
  stream (rounded like `x + y`) and its norm.
- `silu_mul`: SiLU(gate) * up from the gate|up GEMM's output.

Backward is PyTorch's over the model's unfused ops (only the forward must match the sampler).
Checked on the CPU under `TRITON_INTERPRET=1` against those ops and for row invariance
(`tests/test_true_on_policy_gpu.py`); the bitwise match of whole models on the H200.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.kernels import invariant_gpu as gpu
from slipstream.models.decoder import rms_norm
from slipstream.models.rope import apply_rope

try:
    import triton
    import triton.language as tl

    from slipstream.kernels.invariant_gpu import _finish, _tile
except ImportError:  # CPU-only installs: invariant.py's layers run the model's own ops
    triton = None

GLUE_WARPS = 4


def usable(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _multi_linear_kernel(
        x_ptr, w0_ptr, w1_ptr, w2_ptr, out_ptr, part_ptr, M, N0, N1, N2, K, KS,
        stride_x, stride_w0, stride_w1, stride_w2, stride_out,
        IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        first = tl.program_id(1) * BN  # the block's first column of the output
        block = tl.arange(0, BN)
        k_lo = tl.program_id(2) * KS
        k_hi = tl.minimum(k_lo + KS, K)
        if first < N0:
            acc = _tile(
                x_ptr, w0_ptr, rows, M, first + block, N0, k_lo, k_hi, stride_x, stride_w0, IEEE, BM, BN, BK
            )
        elif first < N0 + N1:
            acc = _tile(
                x_ptr,
                w1_ptr,
                rows,
                M,
                first - N0 + block,
                N1,
                k_lo,
                k_hi,
                stride_x,
                stride_w1,
                IEEE,
                BM,
                BN,
                BK,
            )
        else:
            acc = _tile(
                x_ptr, w2_ptr, rows, M, first - N0 - N1 + block, N2, k_lo, k_hi, stride_x, stride_w2,
                IEEE, BM, BN, BK,
            )  # fmt: skip
        _finish(acc, rows, first + block, M, N0 + N1 + N2, out_ptr, stride_out, part_ptr, SPLIT)

    @triton.jit
    def _norm_rope_row(
        src, w_ptr, cos_row, sin_row, dst, eps, NORM: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        """One head of one token: [RMSNorm], RoPE; src/dst point at its D values."""
        d = tl.arange(0, D)
        other = (d + D // 2) % D  # rotate-half's partner of each element
        x = tl.load(src + d).to(tl.float32)
        xo = tl.load(src + other).to(tl.float32)
        if NORM:
            inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)  # one scale for the row, used twice
            w = tl.load(w_ptr + d).to(tl.float32)
            wo = tl.load(w_ptr + other).to(tl.float32)
            x = (
                (w * (x * inv).to(dst.dtype.element_ty).to(tl.float32))
                .to(dst.dtype.element_ty)
                .to(tl.float32)
            )
            xo = (wo * (xo * inv).to(dst.dtype.element_ty).to(tl.float32)).to(dst.dtype.element_ty)
            xo = xo.to(tl.float32)
        rotated = tl.where(d < D // 2, -xo, xo)
        c = tl.load(cos_row + d).to(tl.float32)
        s = tl.load(sin_row + d).to(tl.float32)
        a = (x * c).to(dst.dtype.element_ty).to(tl.float32)
        b = (rotated * s).to(dst.dtype.element_ty).to(tl.float32)
        tl.store(dst + d, (a + b).to(dst.dtype.element_ty))

    @triton.jit
    def _norm_rope_kernel(
        q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out, k_out, T, H, HKV,
        sq_b, sq_t, sk_b, sk_t, s_cos_b, s_cos_t, eps, NORM: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        """Program (token, head): heads 0..H-1 are q's, H..H+HKV-1 k's; out [B, heads, T, D]."""
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        b, t = tok // T, tok % T
        cos_row = cos_ptr + b * s_cos_b + t * s_cos_t
        sin_row = sin_ptr + b * s_cos_b + t * s_cos_t
        if head < H:
            src = q_ptr + b * sq_b + t * sq_t + head * D
            dst = q_out + ((b * H + head) * T + t) * D
            _norm_rope_row(src, qw_ptr, cos_row, sin_row, dst, eps, NORM, D)
        else:
            h = head - H
            src = k_ptr + b * sk_b + t * sk_t + h * D
            dst = k_out + ((b * HKV + h) * T + t) * D
            _norm_rope_row(src, kw_ptr, cos_row, sin_row, dst, eps, NORM, D)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, sum_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        total = (x + y).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * N + cols, total, mask=inside)
        total = total.to(tl.float32)
        normed = total * (1.0 / tl.sqrt(tl.sum(total * total, 0) / N + eps))
        normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, WIDTH, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < WIDTH
        g = tl.load(gu_ptr + row * 2 * WIDTH + cols, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * WIDTH + WIDTH + cols, mask=inside, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * WIDTH + cols, (act * u).to(out_ptr.dtype.element_ty), mask=inside)


def fits(*weights: torch.Tensor) -> bool:
    """Whether `multi_linear` takes these weights: 1-3 of them, one K, each a whole number of column blocks."""
    k = weights[0].shape[1]
    return 1 <= len(weights) <= 3 and all(
        w.shape[1] == k and w.shape[0] % gpu.INVARIANT.n == 0 for w in weights
    )


def _multi_linear_forward(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    *lead, k = x.shape
    rows = x.reshape(-1, k).contiguous()
    ws = [w.contiguous() for w in weights]
    sizes = [w.shape[0] for w in ws] + [0] * (3 - len(ws))
    ws += [ws[-1]] * (3 - len(ws))
    m, n = rows.shape[0], sum(sizes)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = gpu.INVARIANT
    parts, per = gpu.k_splits(n, k)  # as `linear` of one weight of n rows would
    part = gpu.split_output(parts, out)
    _multi_linear_kernel[(triton.cdiv(m, b.m), n // b.n, parts)](
        rows, *ws, out, part, m, *sizes, k, per, rows.stride(0), *[w.stride(0) for w in ws], out.stride(0),
        IEEE=gpu._ieee(x), BM=b.m, BN=b.n, BK=b.k, SPLIT=parts, num_warps=b.warps,
    )  # fmt: skip
    gpu.add_splits(part, out)
    return out.view(*lead, n)


class _MultiLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *weights):
        ctx.save_for_backward(x, *weights)
        return _multi_linear_forward(x, weights)

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        grads = grad.split([w.shape[0] for w in weights], dim=-1)
        grad_x = sum(g @ w for g, w in zip(grads, weights, strict=True)) if ctx.needs_input_grad[0] else None
        flat_x = x.reshape(-1, x.shape[-1])
        grad_ws = [
            g.reshape(-1, g.shape[-1]).t() @ flat_x if ctx.needs_input_grad[1 + i] else None
            for i, g in enumerate(grads)
        ]
        return grad_x, *grad_ws


def multi_linear(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """x @ cat(weights)^T -> [..., sum of rows], each column block as `gpu.linear` computes it."""
    return _MultiLinear.apply(x, *weights)


def _norm_rope_ref(x, weight, eps, cos, sin):
    """The model's ops: x [B,T,H,D] -> [B,H,T,D] normed (weight not None) and rotated."""
    if weight is not None:
        x = rms_norm(x, weight, eps)
    return apply_rope(x.transpose(1, 2), cos, sin)


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, cos, sin, eps):
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
        ctx.eps = eps
        b, t, h, d = q.shape
        hkv = k.shape[2]
        q_out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
        k_out = torch.empty((b, hkv, t, d), dtype=k.dtype, device=k.device)
        norm = q_weight is not None
        _norm_rope_kernel[(b * t, h + hkv)](
            q, k, q_weight if norm else q, k_weight if norm else k, cos, sin, q_out, k_out, t, h, hkv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), cos.stride(1), eps, NORM=norm, D=d,
            num_warps=GLUE_WARPS,
        )  # fmt: skip
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        q, k, qw, kw, cos, sin = ctx.saved_tensors
        inputs = [t.detach().requires_grad_() for t in (q, k)]
        weights = [w if w is None else w.detach().requires_grad_() for w in (qw, kw)]
        with torch.enable_grad():
            outs = [_norm_rope_ref(x, w, ctx.eps, cos, sin) for x, w in zip(inputs, weights, strict=True)]
        wrt = inputs + [w for w in weights if w is not None]
        grads = iter(torch.autograd.grad(outs, wrt, (grad_q, grad_k)))
        grad_q_in, grad_k_in = next(grads), next(grads)
        grad_w = [None if w is None else next(grads) for w in weights]
        return grad_q_in, grad_k_in, *grad_w, None, None, None


def norm_rope(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
    cos: torch.Tensor, sin: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """q [B,T,H,D], k [B,T,Hkv,D] (tokens at any strides: views of a q|k|v output; heads contiguous),
    per-head RMSNorm weights (None: no norm), cos/sin [B,T,D] -> q [B,H,T,D], k [B,Hkv,T,D]."""
    d = q.shape[-1]
    gpu._check_head_dim(d)
    if q.stride(-1) != 1 or q.stride(-2) != d or k.stride(-1) != 1 or k.stride(-2) != d:
        q, k = q.contiguous(), k.contiguous()  # a token's heads side by side (any token strides)
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return _NormRope.apply(q, k, q_weight, k_weight, cos, sin, eps)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight, eps):
        ctx.save_for_backward(x, y, weight)
        ctx.eps = eps
        n = x.shape[-1]
        x, y = x.contiguous(), y.contiguous()
        total, out = torch.empty_like(x), torch.empty_like(x)
        _add_rms_norm_kernel[(x.numel() // n,)](
            x, y, weight.contiguous(), total, out, n, eps, BLOCK=triton.next_power_of_2(n)
        )
        return total, out

    @staticmethod
    def backward(ctx, grad_total, grad_out):
        x, y, weight = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            total = x + y
            out = rms_norm(total, weight, ctx.eps)
        pairs = [(o, g) for o, g in ((total, grad_total), (out, grad_out)) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], (x, y, weight), [g for _, g in pairs])
        return *grads, None


def add_rms_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, RMSNorm(x + y)) as the model computes them, one program a row."""
    return _AddRMSNorm.apply(x, y, weight, eps)


class _SiluMul(torch.autograd.Function):
    BLOCK = 1024

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        *lead, two_i = gate_up.shape
        i = two_i // 2
        rows = gate_up.reshape(-1, two_i).contiguous()
        out = torch.empty((rows.shape[0], i), dtype=gate_up.dtype, device=gate_up.device)
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(i, _SiluMul.BLOCK))](rows, out, i, BLOCK=_SiluMul.BLOCK)
        return out.view(*lead, i)

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate_up = gate_up.detach().requires_grad_()
        with torch.enable_grad():
            gate, up = gate_up.chunk(2, dim=-1)
            out = F.silu(gate) * up
        return torch.autograd.grad(out, gate_up, grad)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a gate|up output [..., 2I] -> [..., I]."""
    return _SiluMul.apply(gate_up)
