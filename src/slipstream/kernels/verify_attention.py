"""Attention for a speculative verify: T consecutive query tokens per sequence over the slot KV
cache, each reading its sequence up to its own position, in one launch (Triton).

Why a kernel. The verify step (`services/rollout/engine/speculative.py`) runs the target over
k + 1 tokens of every running sequence. With the decode kernel (`attention.py`: one query token
per sequence) that is k + 1 launches a layer, 112 for Qwen3-0.6B at k = 3, each streaming the
same keys again, and at batch 1 the verify was launch-bound. Here one program per (sequence, KV
head) takes all T x GQA-group query rows that share those keys (8 rows for Qwen3 at k = 3, padded
to the 16 a tensor-core dot needs), streams the keys and values once, and masks each row at its
own length: query t of a sequence at position p_t attends over 0..p_t, the keys of the earlier
draft tokens included (they were written to the cache first).

Small batches split each sequence's keys across programs and merge the partial softmaxes in a
second kernel, as the decode kernel does and with its split count (a function of the shapes
only, so a CUDA graph stays valid). A row with no key in a split (its length ends before the
split starts) keeps a zero weight there; split 0 always holds key 0 for every row.

Same function as SDPA with a causal mask over the cache: softmax(q k^T / sqrt(D)) v over
positions 0..length-1 per query. fp32 inputs use IEEE dot products; an FP8 cache is widened to
fp16 with the query, as `attention.py` explains.
"""

from __future__ import annotations

import math

import torch

from slipstream.kernels.attention import num_splits

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: SDPA runs instead
    triton = None


def available(q: torch.Tensor) -> bool:
    return triton is not None and q.is_cuda and q.shape[-1] in (16, 32, 64, 128, 256)


if triton is not None:

    @triton.jit
    def _verify_kernel(
        q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, part_ptr, stats_ptr, B,
        stride_qt, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, scale,
        T: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        D: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        m = tl.arange(0, BLOCK_M)  # row m: query token m // GROUP, head m % GROUP of this KV head
        t = m // GROUP
        heads = kvh * GROUP + m % GROUP
        mmask = m < T * GROUP
        d = tl.arange(0, D)
        lens = tl.load(len_ptr + t * B + b, mask=mmask, other=0).to(tl.int32)  # lengths [T, B]
        n = tl.max(lens, axis=0)
        chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(n, lo + chunk)
        q = tl.load(
            q_ptr + t[:, None] * stride_qt + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=mmask[:, None],
            other=0.0,
        )
        if KV_FP8:
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
        for start in range(lo, hi, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            nmask = offs < hi
            kv_offs = offs[:, None] * stride_kn + d[None, :]
            k = tl.load(k_base + kv_offs, mask=nmask[:, None], other=0.0).to(q.dtype)
            v = tl.load(v_base + kv_offs, mask=nmask[:, None], other=0.0).to(q.dtype)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(offs[None, :] < lens[:, None], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with no key yet (past its length in this split) stays at weight 0, not NaN.
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # Output and partials are laid out token-major, [T, B, H, ...]: the o projection's rows.
        row = (t * B + b) * (GROUP * tl.num_programs(1)) + heads
        if SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(
                out_ptr + row[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mmask[:, None]
            )
        else:
            part = row * SPLITS + split
            tl.store(part_ptr + part[:, None] * D + d[None, :], acc, mask=mmask[:, None])
            tl.store(stats_ptr + part * 2, m_i, mask=mmask)
            tl.store(stats_ptr + part * 2 + 1, l_i, mask=mmask)

    @triton.jit
    def _combine_kernel(
        part_ptr, stats_ptr, out_ptr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr
    ):
        row = tl.program_id(0)  # (t * B + b) * H + h
        s = tl.arange(0, BLOCK_S)
        smask = s < SPLITS
        d = tl.arange(0, D)
        part = row * SPLITS + s
        m = tl.load(stats_ptr + part * 2, mask=smask, other=float("-inf"))
        total = tl.load(stats_ptr + part * 2 + 1, mask=smask, other=0.0)
        acc = tl.load(part_ptr + part[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        m_max = tl.max(m, axis=0)  # split 0 holds key 0 of every row: finite
        w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(total * w, axis=0)
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


BLOCK_N, NUM_WARPS, NUM_STAGES = 64, 4, 2


def verify_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """q [T, B, H, D] (query token t of sequence b, token-major); k/v_cache [>=B, Hkv, L, D] (one
    layer's slots); lengths [T, B] (query t of row b attends over its slot's positions
    0..lengths[t, b]-1) -> out [T, B, H, D].

    The split count depends only on shapes (never on lengths), so a CUDA graph stays valid."""
    t, b, h, d = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if splits is None:
        splits = num_splits(b, hkv, k_cache.shape[2])
    out = torch.empty((t, b, h, d), dtype=q.dtype, device=q.device)
    if splits > 1:
        part = torch.empty((t, b, h, splits, d), dtype=torch.float32, device=q.device)
        stats = torch.empty((t, b, h, splits, 2), dtype=torch.float32, device=q.device)
    else:
        part = stats = out  # unused
    _verify_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, lengths.contiguous(), out, part, stats, b,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        1.0 / math.sqrt(d),
        T=t, GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(t * group)), BLOCK_N=BLOCK_N, D=d,
        SPLITS=splits, IEEE=q.dtype == torch.float32 and not kv_fp8, KV_FP8=kv_fp8,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(t * b * h,)](
            part, stats, out, SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)), D=d, num_warps=4
        )
    return out
