"""Decode attention over the slot KV cache, reading each sequence only up to its own length (Triton).

Why a kernel. The plain path (`F.scaled_dot_product_attention` over the cache up to a shared,
bucketed length with a mask) reads every slot to the longest sequence's bucket and, with one query
token per head, runs attention kernels built for long query blocks: on an H200 at batch 256 it took
~4x the time of reading the cache once. Decode is a pure bandwidth problem, so this kernel gives
each (sequence, KV head) one program that streams that head's keys and values once, up to the
sequence's length, for all the query heads that share it (GQA), with an online softmax.

Small batches split each sequence's keys across several programs (flash-decoding): at batch 1 a
(sequence, KV head) grid is 8 programs on a 132-SM GPU, so each takes a slice of the keys and a
second small kernel merges the slices' partial softmaxes. The split count is a function of the
shapes only (batch, heads, cache capacity), so a CUDA graph captured once stays valid. Each loop
iteration requests its key and value tiles together, so twice the bytes are in flight per program.

Same function as SDPA: softmax(q k^T / sqrt(D)) v over positions 0..length-1. fp32 inputs use
IEEE dot products (no TF32), so the fp32 GPU engine gives the CPU engine's tokens.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: SDPA runs instead
    triton = None


def available(q: torch.Tensor) -> bool:
    return triton is not None and q.is_cuda and q.shape[-1] in (16, 32, 64, 128, 256)


if triton is not None:

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, part_ptr, stats_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_ob, stride_oh, scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        SPLITS: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        n = tl.load(len_ptr + b).to(tl.int32)
        # This program's share of the keys: a whole number of blocks, the last split the rest.
        chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(n, lo + chunk)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        gmask = g < GROUP
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0
        )
        if KV_FP8:  # the dots run in fp16: e4m3 widens to it in one instruction per two values
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
        for start in range(lo, hi, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            nmask = offs < hi
            kv_offs = offs[:, None] * stride_kn + d[None, :]
            # Both tiles are requested before either is used: twice the bytes in flight.
            # (an FP8 cache is widened to fp16 here, in registers)
            k = tl.load(k_base + kv_offs, mask=nmask[:, None], other=0.0).to(q.dtype)
            v = tl.load(v_base + kv_offs, mask=nmask[:, None], other=0.0).to(q.dtype)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(nmask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if SPLITS == 1:
            tl.store(
                out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                mask=gmask[:, None],
            )
        else:  # unnormalized partials; _combine_kernel merges the splits
            row = (b * GROUP * tl.num_programs(1) + heads) * SPLITS + split  # [B, H, SPLITS]
            tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])
            tl.store(stats_ptr + row * 2, m_i, mask=gmask)
            tl.store(stats_ptr + row * 2 + 1, l_i, mask=gmask)

    @triton.jit
    def _combine_kernel(
        part_ptr, stats_ptr, out_ptr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr
    ):
        bh = tl.program_id(0)  # b * H + h
        s = tl.arange(0, BLOCK_S)
        smask = s < SPLITS
        d = tl.arange(0, D)
        row = bh * SPLITS + s
        m = tl.load(stats_ptr + row * 2, mask=smask, other=float("-inf"))
        total = tl.load(stats_ptr + row * 2 + 1, mask=smask, other=0.0)
        acc = tl.load(part_ptr + row[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        m_max = tl.max(m, axis=0)  # split 0 always holds a key, so this is finite
        w = tl.where(smask, tl.exp(m - m_max), 0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(total * w, axis=0)
        tl.store(out_ptr + bh * D + d, out.to(out_ptr.dtype.element_ty))


# Chosen on an H200 for head_dim 128, GQA group 2, batch 256 at context 256
# (bench/engine_gpu.py --attention-sweep): 76 us a layer, 3.5 TB/s of KV; every block/warps/stages
# choice from 32/4/2 to 128/8/3 landed within 77-79 us, so the kernel is at the bandwidth it gets.
# An FP8 cache (--sweep-only fp8) is best at 64/4/3: 63 us (2.1 TB/s of half the bytes), 71 us
# at the bf16 choice, when it was widened to bf16 (through fp16 and fp32: several instructions a
# value) and that, not the bytes, limited it. It is widened to fp16 now (one `cvt` per two values
# on sm89+), the query and the softmax weights in fp16 with it (fp16 holds e4m3's whole range and
# more mantissa than bf16; q is clamped to fp16's range).
BLOCK_N, NUM_WARPS, NUM_STAGES = 128, 4, 2
FP8_BLOCK_N, FP8_NUM_WARPS, FP8_NUM_STAGES = 64, 4, 3
_SPLIT_TARGET = 1024  # programs to aim for: below it, split each sequence's keys across programs
_SPLIT_MIN_KEYS = 512  # ... but only a cache this long per split: a merge launch costs more than short loops


def num_splits(batch: int, kv_heads: int, capacity: int) -> int:
    """How many programs share one (sequence, KV head): enough to fill the GPU at small batches
    with long caches (at batch 1 the (sequence, head) grid alone is 8 programs)."""
    want = -(-_SPLIT_TARGET // (batch * kv_heads))
    return max(1, min(want, capacity // _SPLIT_MIN_KEYS, 32))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """q [B, H, 1, D]; k/v_cache [>=B, Hkv, L, D] (one layer's slots); lengths [B] -> out [B, H, 1, D].

    The split count depends only on shapes (never on lengths), so a CUDA graph stays valid."""
    b, h, _, d = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    q3 = q.reshape(b, h, d)
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    # module defaults read per call, so a tuning sweep can set them
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if kv_fp8:
        block_n, num_warps = block_n or FP8_BLOCK_N, num_warps or FP8_NUM_WARPS
        num_stages = num_stages or FP8_NUM_STAGES
    else:
        block_n, num_warps, num_stages = block_n or BLOCK_N, num_warps or NUM_WARPS, num_stages or NUM_STAGES
    if splits is None:
        splits = num_splits(b, hkv, k_cache.shape[2])
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    if splits > 1:
        part = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
        stats = torch.empty((b, h, splits, 2), dtype=torch.float32, device=q.device)
    else:
        part = stats = out  # unused
    _decode_kernel[(b, hkv, splits)](
        q3, k_cache, v_cache, lengths, out, part, stats,
        q3.stride(0), q3.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), 1.0 / math.sqrt(d),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, D=d,
        SPLITS=splits, IEEE=q.dtype == torch.float32 and not kv_fp8, KV_FP8=kv_fp8,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(b * h,)](
            part, stats, out, SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)), D=d, num_warps=4
        )
    return out.view(b, h, 1, d)
