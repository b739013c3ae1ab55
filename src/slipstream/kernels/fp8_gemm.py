"""FP8 GEMM with the wire's block weight scales and per-token activation scales (Triton, CUDA).

out[m, n] = x_scale[m] * sum over 128-wide K steps j of w_scale[n, j] * (xq[m, j-th 128] . wq[n, j-th 128])

Why not `torch._scaled_mm` everywhere. Its row-wise mode (one scale per weight row) needs the
128x128 blocks the trainer pushes (`quant/fp8.py`) re-quantized per row: a second rounding, so the
rollout would not compute with the trainer's numbers. Its block-wise mode (cuBLAS, 1x128 activation
groups x 128x128 weight blocks) computes the same function once each token's scale is repeated over
its groups (`fp8_linear.CUBLAS_FROM_M` routes there), but on torch 2.11 + CUDA 13 on an H200 it
refuses one token, and in the decode step it was slower than this kernel at batch 64 and faster at
256 (docs/benchmarks.md, issue 16). Here the weight scale is one per (row, 128-wide K
step), which holds the wire's blocks exactly (each block's scale repeated over its 128 rows: 3%
of the FP8 bytes) and also survives fusing q|k|v or gate|up whose row counts are not multiples of
128; a [N, 1] scale (one per row) is accepted too. Tiling, split-K and why K goes 128 at a time:
`gemm_plan.py`.

Needs FP8 tensor cores (compute capability 8.9+); `fp8_linear.fp8_matmul` is the entry point and
falls back to dequantize-and-matmul elsewhere. `tests/test_kernels_fp8_gemm.py` pins this kernel
against that definition.
"""

from __future__ import annotations

import torch

from slipstream.kernels import gemm_plan
from slipstream.kernels.gemm_plan import GROUP_K

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def available(x: torch.Tensor) -> bool:
    if triton is None or not x.is_cuda:
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 9)


if triton is not None:

    @triton.jit
    def _fp8_gemm_kernel(
        x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, K,
        stride_xm, stride_wn, stride_wsn, stride_wsk, stride_om,
        CHUNK: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, MERGE_UNROLL: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask, m_mask = offs_n < N, offs_m < M
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # out transposed: weight rows x tokens
        lo = split * CHUNK
        ws_rows = ws_ptr + offs_n * stride_wsn
        ws = tl.load(ws_rows + lo * stride_wsk, mask=n_mask & (lo * BLOCK_K < K), other=0.0)
        for step in range(CHUNK):  # the last split may run past K: masked
            j = lo + step
            k = j * BLOCK_K + offs_k
            k_mask = k < K
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            # the next step's scales now, so their latency hides behind this step's product
            next_ws = tl.load(
                ws_rows + (j + 1) * stride_wsk, mask=n_mask & ((j + 1) * BLOCK_K < K), other=0.0
            )
            acc += tl.dot(w, tl.trans(x)) * ws[:, None]  # each 128-step promoted to fp32
            ws = next_ws
        acc = acc * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[None, :]
        gemm_plan.store_tile(
            acc, out_ptr, part_ptr, count_ptr, bias_ptr, offs_n, offs_m, M, N, stride_om, SPLITS, HAS_BIAS,
            MERGE_UNROLL,
        )  # fmt: skip


def fp8_block_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """xq [M, K] e4m3, x_scale [M, 1] fp32, wq [N, K] e4m3 (rows contiguous), w_scale [N, ceil(K/128)]
    or [N, 1] fp32, bias [N] or None -> [M, N] in out_dtype (CUDA, compute capability 8.9+; tests
    also run it on CPU tensors under TRITON_INTERPRET=1)."""
    m, k = xq.shape
    n = wq.shape[0]
    steps = -(-k // GROUP_K)
    if w_scale.shape not in ((n, steps), (n, 1)) or wq.stride(1) != 1 or xq.stride(1) != 1:
        raise ValueError(
            f"fp8_block_matmul: w_scale {tuple(w_scale.shape)} does not fit a {tuple(wq.shape)} weight "
            f"(want ({n}, {steps}) or ({n}, 1), rows contiguous)"
        )
    x_scale = x_scale.reshape(m).contiguous()
    p = gemm_plan.plan(m, n, k, gemm_plan.num_sms(xq.device))
    out, part, counters = gemm_plan.outputs(m, n, p, out_dtype, xq.device)
    # a [N, 1] scale is read at every K step: stride 0 along K
    stride_wsk = w_scale.stride(1) if w_scale.shape[1] > 1 else 0
    _fp8_gemm_kernel[(triton.cdiv(n, p.block_n), triton.cdiv(m, p.block_m), p.splits)](
        xq, x_scale, wq, w_scale, bias if bias is not None else w_scale, out, part, counters, m, n, k,
        xq.stride(0), wq.stride(0), w_scale.stride(0), stride_wsk, out.stride(0),
        CHUNK=p.chunk, SPLITS=p.splits, HAS_BIAS=bias is not None, MERGE_UNROLL=gemm_plan.MERGE_UNROLL,
        BLOCK_N=p.block_n, BLOCK_M=p.block_m, BLOCK_K=GROUP_K, num_warps=p.num_warps, num_stages=p.num_stages,
    )  # fmt: skip
    return out
