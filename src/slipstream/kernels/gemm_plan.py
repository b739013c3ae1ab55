"""How the low-precision GEMMs (`fp8_gemm.py`, `w4a16.py`) tile their work, and the epilogue they
share: bias, output, and the split-K merge (CUDA; tests also run them under Triton's interpreter).

Why swap A and B. A decode step multiplies a few tokens (M = 1..256) by a large weight (N x K).
Tensor cores want at least 64 rows on their "M" side, so the weight's rows take that side and the
tokens the other (16..128 columns): each program computes out[m-tile, n-tile] transposed, from a
[BLOCK_N, 128] weight tile and a [BLOCK_M, 128] activation tile per step. The same kernel serves
prefill's thousands of tokens with larger tiles.

Why split K. At small M a GEMM is a stream of weight bytes, and the bandwidth is only there when
every SM has programs in flight; an o/down projection with N = 1024 is 16 tiles of 64 rows on a
132-SM GPU. Below two programs per SM the K range is split across programs: each writes an fp32
partial and counts itself in on its tile's counter, and the last one to arrive sums all the
partials in split order (the result does not depend on which one is last), adds the bias, stores
the output and resets the counter for the next call; no merge launch (a decode step at batch 1
would otherwise pay one per split GEMM). The split count depends only on the shapes, so a CUDA
graph captured once stays valid. The counters are one zeroed buffer per device, allocated on the
first call (before any graph capture: the engine runs each step eagerly once first); calls on
one stream never share them at the same time.

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
# Decode (M <= 256) tiling, read per call so a tuning sweep (bench/precision_gpu.py --gemm-sweep)
# can set them: weight rows per program, pipeline stages, and the programs per SM that split-K
# aims for. Chosen without a GPU at hand (sm_90 compiles: wgmma, 3-stage cp.async); the sweep says
# whether another choice is faster.
DECODE_BLOCK_N, DECODE_STAGES, SPLIT_PROGRAMS_PER_SM = 64, 3, 2
# Tokens per program at decode (the tensor cores' N side) and warps: a larger token tile reads each
# weight tile fewer times at batch 64-256.
DECODE_BLOCK_M, DECODE_WARPS = 64, 4
# W4A16 at one token runs without tensor cores (`w4a16.py`'s GEMV; False: the tensor-core kernel):
# weight rows per program, warps, pipeline stages, and the programs per SM its split-K aims for.
W4A16_GEMV = True
GEMV_BLOCK_N, GEMV_WARPS, GEMV_STAGES, GEMV_PROGRAMS_PER_SM = 128, 4, 3, 4
# How many groups' words the GEMV loads ahead, into registers (0, 1 or 2: Triton does not pipeline
# a loop's plain loads), and whether each thread loads its own rows' group scales (no trip through
# shared memory and no barriers a step: `w4a16._group_scales`). On the H200 (docs/benchmarks.md,
# issue 16, the Qwen3-8B shape at batch 1, two runs each): session 12, one group ahead and own
# scales made the decode step's replay 3.15 ms against 3.29 (own scales alone 3.19-3.20, the
# look-ahead alone 3.32-3.33; 64 rows a program, 8 per SM, 3.31-3.36); session 13, two groups ahead
# 3.111-3.115 ms against one group's 3.39 in the same runs (1.557-1.561x bf16 against 1.43x; the
# GEMV's 144 launches 2,187 us a step against 2,457; 127 registers against 96). Lost in those
# runs (bb08944/bbe192c, since removed): Triton's pipeliner staging the words through shared memory
# (cp.async, the loop given num_stages 3/4: 3.50-3.58 ms), a programmatic dependent launch (3.47
# ms; 3.20-3.21 with two ahead), two programs per SM with two ahead (3.39).
GEMV_PREFETCH = 2
GEMV_OWN_SCALES = True
# Whether the FP8 kernel's split-K merge (the last split of a tile sums every split's partial) is
# unrolled, so its loads from L2 are issued together instead of one round trip per split: LLVM
# leaves the loop rolled for [64, 64] tiles (sm_90 SASS: 180 loads rolled, 276 unrolled). The same
# sum in the same order either way. On the H200 (session 12, 8B shape, two runs) batch 64's step
# replayed in 4.37-4.38 ms against 4.40 (1.250-1.253x bf16 against 1.244-1.245x), batch 1 the same.
# The W4A16 kernels keep the loop: the GEMV's is unrolled by LLVM anyway (one value a thread).
MERGE_UNROLL = True


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
        block_m = min(DECODE_BLOCK_M, max(16, triton.next_power_of_2(m)))
        block_n, warps = DECODE_BLOCK_N, DECODE_WARPS
    steps = triton.cdiv(k, GROUP_K)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if m > 256:
        chunk, stages = steps, 3
    else:  # a power of two: K steps per program is a compile-time constant, so few variants compile
        want = min(triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, tiles), steps, _MAX_SPLITS)
        chunk, stages = triton.next_power_of_2(triton.cdiv(steps, want)), DECODE_STAGES
    return Plan(block_n, block_m, chunk, triton.cdiv(steps, chunk), warps, stages)


def gemv_plan(n: int, k: int, sms: int) -> Plan:
    """Tiles for W4A16's one-token GEMV (`w4a16.py`): GEMV_BLOCK_N weight rows a program, K split
    until every SM has GEMV_PROGRAMS_PER_SM programs (a function of the shapes only)."""
    steps, tiles = triton.cdiv(k, GROUP_K), triton.cdiv(n, GEMV_BLOCK_N)
    want = min(triton.cdiv(GEMV_PROGRAMS_PER_SM * sms, tiles), steps, _MAX_SPLITS)
    chunk = triton.next_power_of_2(triton.cdiv(steps, want))
    return Plan(GEMV_BLOCK_N, 1, chunk, triton.cdiv(steps, chunk), GEMV_WARPS, GEMV_STAGES)


_MAX_TILES = 4096  # a split GEMM has fewer tiles than SPLIT_PROGRAMS_PER_SM per SM
_counters: dict[tuple[str, int | None], torch.Tensor] = {}


def _tile_counters(device: torch.device) -> torch.Tensor:
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    key = (device.type, index)
    counters = _counters.get(key)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "gemm_plan: the first split-K GEMM on a device must run before any CUDA graph capture"
            )
        counters = _counters[key] = torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)
    return counters


def outputs(m: int, n: int, p: Plan, dtype: torch.dtype, device: torch.device):
    """(out [m, n]; the fp32 partials [splits, m, n] and the tile counters, or `out` twice unsplit)."""
    out = torch.empty((m, n), dtype=dtype, device=device)
    if p.splits == 1:
        return out, out, out
    if triton.cdiv(n, p.block_n) * triton.cdiv(m, p.block_m) > _MAX_TILES:
        raise ValueError(f"gemm_plan: a split-K GEMM of more than {_MAX_TILES} tiles ({m} x {n})")
    part = torch.empty((p.splits, m, n), dtype=torch.float32, device=device)
    return out, part, _tile_counters(device)


if triton is not None:

    @triton.jit
    def _store_out(acc, out_ptr, bias_ptr, offs_n, offs_m, n_mask, mask, stride_om, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        dst = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def store_tile(
        acc, out_ptr, part_ptr, count_ptr, bias_ptr, offs_n, offs_m, M, N, stride_om,
        SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, MERGE_UNROLL: tl.constexpr,
    ):  # fmt: skip
        """Write a program's [BLOCK_N, BLOCK_M] tile of out (transposed), through the split-K
        merge when K is split (program axis 2)."""
        n_mask, m_mask = offs_n < N, offs_m < M
        mask = n_mask[:, None] & m_mask[None, :]
        if SPLITS > 1:
            part = part_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]  # split 0's tile
            tl.store(part + tl.program_id(2).to(tl.int64) * M * N, acc, mask=mask)
            tile = count_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            # Every thread's partial is stored before the increment (the barrier), and acq_rel makes
            # them visible to the program that sees the count reach SPLITS - 1.
            tl.debug_barrier()
            if tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
                total = tl.zeros_like(acc)
                # a fixed order: the same sum whichever split came last
                if MERGE_UNROLL:
                    for s in tl.static_range(SPLITS):
                        total += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                else:
                    for s in range(SPLITS):
                        total += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(tile, 0)
                _store_out(total, out_ptr, bias_ptr, offs_n, offs_m, n_mask, mask, stride_om, HAS_BIAS)
        else:
            _store_out(acc, out_ptr, bias_ptr, offs_n, offs_m, n_mask, mask, stride_om, HAS_BIAS)
