"""FP8 128x128-block quantize and dequantize (the wire format of `quant/fp8.py`) as one Triton launch
per matrix.

Why. The plain-PyTorch recipe is ~8 kernels per matrix (pad, fp32 copy, abs, amax, divide,
clamp, cast, slice) and a weight version has ~200 matrices: on a GPU the launches, not the
bytes, set the time (about 30 ms of the 0.6B version's 39 ms to pack for CUDA IPC). Here one
program handles one block: load it, take its amax, scale, saturate, cast, store the block's
scale, so a matrix is one launch and one pass over memory each way.

Same numbers, bit for bit: the arithmetic is the reference's in the same order, in fp32 with
correctly rounded division (`div_rn`; Triton's `/` is not correctly rounded on NVIDIA) and
round-to-nearest-even casts; `tests/test_weights_ipc.py` pins both kernels to the reference on
the GPU. `quant.fp8` calls these on CUDA tensors and keeps the PyTorch path everywhere else.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK = 128  # = quant.fp8.BLOCK (not imported: quant imports this module)
FP8_MAX = 448.0


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and t.dim() == 2


if triton is not None:

    @triton.jit
    def _quantize_kernel(x_ptr, q_ptr, s_ptr, M, N, stride_x, stride_q, n_col_blocks, BLOCK: tl.constexpr):
        bm, bn = tl.program_id(0), tl.program_id(1)
        rows = bm * BLOCK + tl.arange(0, BLOCK)
        cols = bn * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, 448.0), 1.0)
        scaled = tl.math.div_rn(x, tl.zeros([BLOCK, BLOCK], dtype=tl.float32) + scale)
        q = tl.minimum(tl.maximum(scaled, -448.0), 448.0)
        tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + bm * n_col_blocks + bn, scale)

    @triton.jit
    def _dequantize_kernel(q_ptr, s_ptr, w_ptr, M, N, stride_q, stride_w, n_col_blocks, BLOCK: tl.constexpr):
        bm, bn = tl.program_id(0), tl.program_id(1)
        rows = bm * BLOCK + tl.arange(0, BLOCK)
        cols = bn * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(s_ptr + bm * n_col_blocks + bn)
        w = q * scale
        tl.store(w_ptr + rows[:, None] * stride_w + cols[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def _grid(m: int, n: int) -> tuple[int, int]:
    return (-(-m // BLOCK), -(-n // BLOCK))


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quant.quantize_blockwise` for a 2-D CUDA matrix: (q e4m3 [M, N], scale_inv fp32 [M/128, N/128])."""
    if w.stride(-1) != 1:
        w = w.contiguous()
    m, n = w.shape
    grid = _grid(m, n)
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(grid, dtype=torch.float32, device=w.device)
    if q.numel():
        _quantize_kernel[grid](w, q, scale, m, n, w.stride(0), q.stride(0), grid[1], BLOCK=BLOCK)
    return q, scale


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quant.dequantize_blockwise` for a 2-D CUDA matrix, written straight in `dtype`."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    scale_inv = scale_inv.to(torch.float32).contiguous()
    m, n = q.shape
    grid = _grid(m, n)
    w = torch.empty((m, n), dtype=dtype, device=q.device)
    if w.numel():
        _dequantize_kernel[grid](q, scale_inv, w, m, n, q.stride(0), w.stride(0), grid[1], BLOCK=BLOCK)
    return w
