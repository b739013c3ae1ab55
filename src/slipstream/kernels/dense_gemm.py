"""A bf16/fp16 GEMM for the decode step's projections at large batch (Triton), used only where a
measurement says it beats cuBLAS.

Why. At batch 256 the four projections of a Qwen3-0.6B layer are GEMMs with M = 256 and
N x K = 4096 x 1024 (q|k|v), 1024 x 2048 (o), 6144 x 1024 (gate|up), 1024 x 3072 (down). cuBLAS
picks small tiles for them (48x64, 64x32: many programs, each weight tile re-read by several
M tiles) and the 28 layers' GEMMs took 0.79 ms of a 3.5 ms step where their weight bytes need
0.27 ms. Whether larger tiles win is a question for the GPU, not for this file: `PLAN` maps a
weight's (N, K) to the tile that won against `F.linear` in `bench/engine_gpu.py --gemm-sweep` on
that GPU, and is empty where nothing won; `linear` runs the plan's tile or `F.linear`.

The kernel is the textbook one: an output tile [BLOCK_M, BLOCK_N] from K steps of BLOCK_K in
order (no split-K), an fp32 accumulator, the bias added in fp32 and one rounding to the output
dtype, so results are those of `F.linear` within the dtype's rounding. Programs walk the tiles in
groups of GROUP_M along M so that the M tiles sharing a weight tile run together and the weight
streams from memory about once. The tile is a function of the weight's shape alone (CUDA graphs).
--true-on-policy-mode never comes here: its decode runs the batch-invariant kernels
(`invariant_gpu.py`) through the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear
    triton = None


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    group_m: int = 8


# The candidates `bench/engine_gpu.py --gemm-sweep` times against F.linear at each shape.
CANDIDATES = (
    Tile(64, 64, 64, 4, 4),
    Tile(64, 128, 64, 4, 4),
    Tile(128, 64, 64, 4, 4),
    Tile(128, 128, 64, 8, 3),
    Tile(256, 64, 64, 8, 3),
    Tile(64, 64, 128, 4, 3),
    Tile(128, 32, 128, 4, 3),
)
# (N, K) -> the tile that beat F.linear at M = MIN_M on the GPU; empty: F.linear everywhere.
PLAN: dict[tuple[int, int], Tile] = {}
MIN_M = 128  # below this many rows the decode step is a weight stream that cuBLAS's GEMV-like tiles serve


def available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        triton is not None
        and x.is_cuda
        and x.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
    )


if triton is not None:

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        group = pid // per_group
        first_m = group * GROUP_M
        size_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        x_tile = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
        w_tile = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_ok = (k + rk) < K
            a = tl.load(x_tile, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
            b = tl.load(w_tile, mask=(rn[:, None] < N) & k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
            x_tile += BLOCK_K
            w_tile += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: Tile) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) in `tile`'s tiling; x's dtype out."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
    _gemm_kernel[grid](
        x, weight, bias if bias is not None else out, out, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, GROUP_M=tile.group_m, num_warps=tile.warps, num_stages=tile.stages,
    )  # fmt: skip
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through `PLAN`'s tile where one won for this weight at this batch."""
    tile = PLAN.get(tuple(weight.shape)) if x.shape[0] >= MIN_M and available(x, weight) else None
    if tile is None:
        return F.linear(x, weight, bias)
    return gemm(x, weight, bias, tile)
