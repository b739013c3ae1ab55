"""How the low-precision GEMMs (`fp8_gemm.py`, `w4a16.py`) tile their work, and the split-K merge
they share (CUDA only).

Why swap A and B. A decode step multiplies a few tokens (M = 1..256) by a large weight (N x K).
Tensor cores want at least 64 rows on their "M" side, so the weight's rows take that side and the
tokens the other (16..128 columns): each program computes out[m-tile, n-tile] transposed, from a
[BLOCK_N, 128] weight tile and a [BLOCK_M, 128] activation tile per step. The same kernel serves
prefill's thousands of tokens with larger tiles.

Why split K. At small M a GEMM is a stream of weight bytes, and the bandwidth is only there when
every SM has programs in flight; an o/down projection with N = 1024 is 16 tiles of 64 rows on a
132-SM GPU. Below two programs per SM the K range is split across programs, each writes an fp32
partial, and `merge_splits` sums them in a fixed order (no atomics, so results do not depend on
scheduling) and adds the bias. The split count depends only on the shapes, so a CUDA graph
captured once stays valid.

K is walked in steps of 128, the quantization group of both formats (FP8's 128x128 weight
blocks, int4's 128-wide groups): each step's product is scaled once and added to an fp32
accumulator, which also bounds FP8 tensor cores' reduced-precision accumulation to 128 products
(DeepSeek-V3's promotion interval).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers dequantize and matmul instead
    triton = None

GROUP_K = 128  # K per step: the scale group of FP8 blocks and int4 groups alike
_MAX_SPLITS = 16


@dataclass(frozen=True)
class Plan:
    block_n: int  # weight rows per program (the tensor cores' M side)
    block_m: int  # tokens per program
    chunk: int  # K steps (of GROUP_K) per program
    splits: int  # programs along K; 1 writes the output directly
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=8)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """The device's SM count (16 off CUDA: Triton's CPU interpreter, in tests)."""
    if device.type != "cuda":
        return 16
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def plan(m: int, n: int, k: int, sms: int) -> Plan:
    """Tiles for an [m, k] x [k, n] product on a GPU with `sms` SMs (a function of the shapes only)."""
    if m > 256:  # prefill: compute-bound, big square-ish tiles
        block_m, block_n, warps = 128, 128, 8
    else:
        block_m, block_n, warps = min(64, max(16, triton.next_power_of_2(m))), 64, 4
    steps = triton.cdiv(k, GROUP_K)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if m > 256:
        chunk = steps
    else:  # a power of two: K steps per program is a compile-time constant, so few variants compile
        want = min(triton.cdiv(2 * sms, tiles), steps, _MAX_SPLITS)
        chunk = triton.next_power_of_2(triton.cdiv(steps, want))
    return Plan(block_n, block_m, chunk, triton.cdiv(steps, chunk), warps, 3)


if triton is not None:

    @triton.jit
    def _merge_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om, SPLITS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        m = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(SPLITS):  # a fixed order: the same sum every run
            acc += tl.load(part_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def outputs(m: int, n: int, p: Plan, dtype: torch.dtype, device: torch.device):
    """(out [m, n], the fp32 partials [splits, m, n] or `out` itself when unsplit)."""
    out = torch.empty((m, n), dtype=dtype, device=device)
    part = torch.empty((p.splits, m, n), dtype=torch.float32, device=device) if p.splits > 1 else out
    return out, part


def merge_splits(part: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out = sum of the partials [splits, M, N] (+ bias), in out's dtype."""
    splits, m, n = part.shape
    block = min(1024, triton.next_power_of_2(n))
    _merge_kernel[(m, triton.cdiv(n, block))](
        part, bias if bias is not None else part, out, m, n, out.stride(0),
        SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out
