"""Decode attention over the slot KV cache, reading each sequence only up to its own length (Triton).

Why a kernel. The plain path (`F.scaled_dot_product_attention` over the cache up to a shared,
bucketed length with a mask) reads every slot to the longest sequence's bucket and, with one query
token per head, runs attention kernels built for long query blocks: on an H200 at batch 256 it took
~4x the time of reading the cache once. Decode is a pure bandwidth problem, so this kernel gives
each (sequence, KV head) one program that streams that head's keys and values once, up to the
sequence's length, for all the query heads that share it (GQA), with an online softmax.

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
        q_ptr, k_ptr, v_ptr, len_ptr, out_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_ob, stride_oh, scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        n = tl.load(len_ptr + b).to(tl.int32)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        gmask = g < GROUP
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0
        )
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
        for start in range(0, n, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            nmask = offs < n
            kv_offs = offs[:, None] * stride_kn + d[None, :]
            k = tl.load(k_base + kv_offs, mask=nmask[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(nmask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + kv_offs, mask=nmask[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=gmask[:, None],
        )


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """q [B, H, 1, D]; k/v_cache [>=B, Hkv, L, D] (one layer's slots); lengths [B] -> out [B, H, 1, D]."""
    b, h, _, d = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    q3 = q.reshape(b, h, d)
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    _decode_kernel[(b, hkv)](
        q3, k_cache, v_cache, lengths, out,
        q3.stride(0), q3.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), 1.0 / math.sqrt(d),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=64, D=d,
        IEEE=q.dtype == torch.float32, num_warps=4,
    )  # fmt: skip
    return out.view(b, h, 1, d)
