"""Causal attention over packed sequences: several sequences concatenated into one row.

The trainer packs a micro-batch's samples end to end (no padding) and restarts RoPE positions
at each sequence start; this module supplies the other half, attention that stays inside each
sequence (document masking). `cu_seqlens` [S+1] int32 are the sequence boundaries in the row,
as FlashAttention's varlen kernels take them.

On CUDA the work goes to PyTorch's FlashAttention varlen kernel (`torch.nn.attention.varlen`),
which reads only the S causal triangles. Where that kernel is missing (the CPU, an older torch,
fp32) the fallback runs plain causal SDPA on each run of consecutive sequences of one length as
one [n, H, L, D] batch (views of the row, no copies). The trainer packs a micro-batch shortest
first (`batch.pack`), so a row of 512 short samples costs as many SDPA calls as it has distinct
lengths (about ten), not 512. Tested against the padded path.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from .decoder import Attention


@functools.cache
def _varlen_kernel():
    """(varlen_attn, keyword arguments for causal + GQA) or None where torch has no such kernel."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # torch 2.9 spelled causality `is_causal`; later releases use a (left, right) window.
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in params


def _runs(bounds: list[int]) -> list[tuple[int, int, int]]:
    """(start, L, n) for each run of n consecutive sequences of length L in the packed row."""
    runs: list[list[int]] = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if runs and runs[-1][1] == e - s:
            runs[-1][2] += 1
        else:
            runs.append([s, e - s, 1])
    return [(s, n, count) for s, n, count in runs]


def _per_run(q, k, v, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """Causal SDPA inside each sequence, one call per run of equal lengths (q/k/v [1, H, N, D])."""
    if not runs:
        return torch.empty_like(q)
    outs = []
    for start, n, count in runs:
        qs, ks, vs = (
            x[0, :, start : start + n * count].unflatten(1, (count, n)).transpose(0, 1) for x in (q, k, v)
        )
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)  # [count, H, n, D]
        outs.append(o.transpose(0, 1).flatten(1, 2))
    return torch.cat(outs, dim=1)[None]


def packed_causal_attention(cu_seqlens: torch.Tensor, max_len: int, use_kernel: bool = True) -> Attention:
    """An `Attention` for one packed row (q/k/v [1,H,N,D]) whose sequences end at `cu_seqlens[1:]`."""
    kernel = _varlen_kernel() if use_kernel and cu_seqlens.is_cuda else None
    runs = None if kernel else _runs(cu_seqlens.tolist())

    def attention(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        half = (torch.bfloat16, torch.float16)
        if kernel is not None and q.dtype not in half and torch.is_autocast_enabled(q.device.type):
            # A custom op is invisible to autocast: cast as SDPA would be (q/k leave fp32 RMSNorms).
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if kernel is None or q.dtype not in half:  # FlashAttention has no fp32 kernel
            return _per_run(q, k, v, runs if runs is not None else _runs(cu_seqlens.tolist()))
        varlen_attn, causal, gqa = kernel
        qt, kt, vt = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # [N, H, D]
        extra = dict(causal)
        if gqa:
            extra["enable_gqa"] = True
        elif kt.shape[1] != qt.shape[1]:
            rep = qt.shape[1] // kt.shape[1]
            kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
        out = varlen_attn(qt, kt, vt, cu_seqlens, cu_seqlens, max_len, max_len, **extra)
        return out.transpose(0, 1)[None]

    return attention
