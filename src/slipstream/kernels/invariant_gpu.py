"""Batch-invariant kernels on the GPU (--true-on-policy-mode on CUDA), in Triton.

The contract is `invariant.py`'s: a token's numbers never depend on the batch it is computed in,
so the log-prob the engine's sampler reports for a token it decoded (one row of a decode step over
its KV cache) equals the trainer's (one position of a padded causal forward) bit for bit. On the
GPU what varies with the batch is the library's choice of kernel: cuBLAS picks its GEMM tiles and
split-K from M, attention kernels split the keys differently for one query than for a block of
them, and a reduction's thread layout follows its shape. Here every kernel's tiling is a constant:

- `linear`: x @ W^T in [BLOCK_M, BLOCK_N] tiles with the K range walked in BLOCK_K steps from 0,
  the same tensor-core instruction for every M (a row's result is a function of that row alone;
  rows past M are masked loads). A weight with few column blocks (N = hidden: o_proj, down_proj)
  splits K in parts fixed by its shape (`k_splits`), added in part order: more programs at
  decode's few rows, the same split for the trainer's many.
- `grouped_linear` (a mixture-of-experts layer's experts): `linear`'s tile loop over token-slot
  rows sorted by expert, each expert's rows in BLOCK_M-row tiles that start at its first row and
  mask the rows past its last, so a row meets `linear(row, weight[e])`'s arithmetic exactly. The
  per-expert counts stay on the device: which expert and row range each program takes is a table
  built by tensor ops, over a grid sized from the shapes alone (programs past the real tiles
  return at once), so the engine's CUDA graphs can capture it, where `Experts.forward`'s loop over
  the experts reads the counts on the host.
- `causal_attention` (trainer, engine prefill) and `decode_attention` (engine decode) share one
  loop, `_attend`: a QUERY_ROWS tile of query rows against key blocks of KEYS from position 0 up,
  online softmax. A training tile's rows are QUERY_ROWS positions of one head; a decode tile's rows
  are the query heads that share one KV head (in tiles of QUERY_ROWS, the last padded): the same
  instructions either way. Keys past a
  row's own position score -inf and weigh exact zeros, and a block that holds none of a row's keys
  leaves its running max, sum and output exactly as they were, so a row gets the same numbers over
  the trainer's T keys as over the engine's cache up to its length.
- `rms_norm`: one program per row over the whole row.
- The sampled token's log-prob is `kernels.sampling`'s own kernel (`sampling.log_probs`): the
  trainer computes it with the loop the sampler ran.

Backward is PyTorch's over the same function (only the forward must match the sampler; the grouped
GEMM's backward loops over the experts, reading their counts on the host).
Everything is checked on the CPU under `TRITON_INTERPRET=1` against PyTorch and for row/length
invariance (`tests/test_true_on_policy_gpu.py`); the bitwise match of whole models on the H200.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from slipstream.models.decoder import rms_norm as model_rms_norm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: invariant.py's PyTorch kernels run instead
    triton = None

BLOCK_M = 64  # GEMM rows per tile
BLOCK_N = 64  # GEMM columns
BLOCK_K = 64  # GEMM inputs per step
WARPS = 4
KEYS = 64  # attention's keys per step
# attention's query rows a tile: a training tile's positions of one head, a decode tile's query
# heads of one KV head (Qwen3-0.6B: 2; padding is MMA work at decode, where 64 rows cost ~4x 16)
QUERY_ROWS = 16


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def _check_head_dim(d: int) -> None:
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"--true-on-policy-mode on the GPU: head_dim {d} is not one of 16, 32, 64, 128, 256")


if triton is not None:

    @triton.jit
    def _tile(
        x_ptr, w_ptr, rows, row_end, cols, N, k_lo, k_hi, stride_x, stride_w,
        IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        """x[rows] @ w[cols]^T over inputs k_lo..k_hi-1 in BK steps from k_lo, fp32: the one loop
        every GEMM of this module runs, so a row's numbers are the same in each (rows from row_end
        on, columns from N on and inputs from k_hi on load zeros)."""
        ks = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            k = k0 + ks
            x = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * stride_x + k[None, :],
                mask=(rows[:, None] < row_end) & (k[None, :] < k_hi), other=0.0,
            )  # fmt: skip
            w = tl.load(
                w_ptr + cols[None, :].to(tl.int64) * stride_w + k[:, None],
                mask=(cols[None, :] < N) & (k[:, None] < k_hi), other=0.0,
            )  # fmt: skip
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        return acc

    @triton.jit
    def _finish(acc, rows, cols, M, N, out_ptr, stride_out, part_ptr, SPLIT: tl.constexpr):
        """A tile's result: to the output in its dtype, or (split-K) its split's fp32 share to
        part [SPLIT, M, N] for `_split_sum_kernel` to add in split order."""
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        if SPLIT == 1:
            out = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=inside)
        else:
            share = (tl.program_id(2).to(tl.int64) * M + rows[:, None]) * N + cols[None, :]
            tl.store(part_ptr + share, acc, mask=inside)

    @triton.jit
    def _linear_kernel(
        x_ptr, w_ptr, out_ptr, part_ptr, M, N, K, KS, stride_x, stride_w, stride_out,
        IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        k_lo = tl.program_id(2) * KS
        k_hi = tl.minimum(k_lo + KS, K)
        acc = _tile(x_ptr, w_ptr, rows, M, cols, N, k_lo, k_hi, stride_x, stride_w, IEEE, BM, BN, BK)
        _finish(acc, rows, cols, M, N, out_ptr, stride_out, part_ptr, SPLIT)

    @triton.jit
    def _split_sum_kernel(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """out = part[0] + part[1] + ... in that order, fp32, rounded once."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = i < MN
        acc = tl.load(part_ptr + i, mask=inside, other=0.0)
        for s in tl.static_range(1, SPLIT):
            acc += tl.load(part_ptr + s * MN + i, mask=inside, other=0.0)
        tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _grouped_linear_kernel(
        x_ptr, w_ptr, out_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, N, K,
        stride_x, stride_we, stride_wn, stride_out,
        IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        """`_linear_kernel` on the BM rows from start, those before end (the expert's end row),
        against that expert's weight: the same `_tile`, so the same numbers a row."""
        start = tl.load(tile_start_ptr + tl.program_id(0))
        end = tl.load(tile_end_ptr + tl.program_id(0))
        if start >= end:  # past the real tiles (the grid is an upper bound)
            return
        w_base = w_ptr + tl.load(tile_expert_ptr + tl.program_id(0)).to(tl.int64) * stride_we
        rows = start + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = _tile(x_ptr, w_base, rows, end, cols, N, 0, K, stride_x, stride_wn, IEEE, BM, BN, BK)
        out = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < end) & (cols[None, :] < N))

    @triton.jit
    def _attend(
        q, pos, k_base, v_base, stride_kn, num_keys, n_blocks, scale,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """q [BM, D] (rows at positions pos [BM]) against keys 0..pos of one (sequence, KV head),
        whose keys and values start at k_base/v_base, num_keys of them in memory; n_blocks key
        blocks from 0. -> [BM, D] fp32."""
        d = tl.arange(0, D)
        run_max = tl.full([BM], float("-inf"), tl.float32)
        run_sum = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for j in range(0, n_blocks):
            keys = j * BN + tl.arange(0, BN)
            inside = keys[:, None] < num_keys
            offs = keys[:, None].to(tl.int64) * stride_kn + d[None, :]
            k = tl.load(k_base + offs, mask=inside, other=0.0)
            v = tl.load(v_base + offs, mask=inside, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(keys[None, :] <= pos[:, None], s * scale, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(s, 1))
            alpha = tl.exp(run_max - new_max)
            p = tl.exp(s - new_max[:, None])
            run_sum = run_sum * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            run_max = new_max
        return acc / run_sum[:, None]

    @triton.jit
    def _causal_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, T, H, GROUP,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, so_b, so_h, so_t, scale,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One program: BM positions of one (sequence, query head); keys of its KV head."""
        b = (tl.program_id(1) // H).to(tl.int64)
        h = tl.program_id(1) % H
        t = tl.program_id(0) * BM + tl.arange(0, BM)
        d = tl.arange(0, D)
        rows = t[:, None] < T
        q = tl.load(q_ptr + b * sq_b + h * sq_h + t[:, None] * sq_t + d[None, :], mask=rows, other=0.0)
        last = tl.minimum(tl.program_id(0) * BM + BM, T)  # keys up to the tile's last position
        kv = b * sk_b + (h // GROUP) * sk_h
        out = _attend(q, t, k_ptr + kv, v_ptr + kv, sk_t, T, tl.cdiv(last, BN), scale, D, BM, BN, IEEE)
        dst = out_ptr + b * so_b + h * so_h + t[:, None] * so_t + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=rows)

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, GROUP,
        sq_b, sq_h, sk_b, sk_h, sk_t, so_b, so_h, scale,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One program: BM of the query heads of one (slot, KV head) at the slot's last position,
        as the rows of a BM tile (past the group's last: padding); keys from the cache up to the
        slot's length."""
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        g = tl.program_id(2) * BM + tl.arange(0, BM)
        d = tl.arange(0, D)
        rows = g[:, None] < GROUP
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=rows, other=0.0)
        n = tl.load(len_ptr + b).to(tl.int32)
        pos = tl.zeros([BM], tl.int32) + (n - 1)
        kv = b * sk_b + kvh * sk_h
        out = _attend(q, pos, k_ptr + kv, v_ptr + kv, sk_t, n, tl.cdiv(n, BN), scale, D, BM, BN, IEEE)
        tl.store(
            out_ptr + b * so_b + heads[:, None] * so_h + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=rows,
        )

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr, pos_ptr, kc_ptr, vc_ptr, sk_n, sk_h, sv_n, sv_h, sc_n, sc_h, sc_t,
        D: tl.constexpr,
    ):  # fmt: skip
        """Program (slot, KV head): the step's key and value into the cache at the slot's position."""
        i = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        d = tl.arange(0, D)
        dst = i * sc_n + h * sc_h + tl.load(pos_ptr + i).to(tl.int64) * sc_t + d
        tl.store(kc_ptr + dst, tl.load(k_ptr + i * sk_n + h * sk_h + d))
        tl.store(vc_ptr + dst, tl.load(v_ptr + i * sv_n + h * sv_h + d))

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        normed = x * (1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps))
        # The model's order: normalise in fp32, round to the input's dtype, then scale.
        normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=inside)


class Blocks(NamedTuple):
    """A GEMM's tiling: rows, columns and inputs a step per program, and warps a program."""

    m: int = BLOCK_M
    n: int = BLOCK_N
    k: int = BLOCK_K
    warps: int = WARPS


INVARIANT = Blocks()  # the mode's one tiling of every GEMM, trainer and engine


def _ieee(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32  # fp32 stays fp32 (no TF32); bf16/fp16 use the tensor cores as they are


# Split-K, by the weight's shape alone (never the rows): a GEMM whose column blocks are too few to
# fill the GPU at decode's few rows (o_proj and down_proj: N = hidden) splits its K range in fixed
# parts, each summed by `_tile`, then added in part order (`_split_sum_kernel`). The trainer's
# GEMM of the same weight splits the same way, so a row's numbers still depend on the row alone.
SPLIT_PROGRAMS = 128  # column blocks x splits aimed at (0: no split-K)
SPLIT_MIN_K = 256  # the fewest inputs one split sums


def k_splits(n: int, k: int) -> tuple[int, int]:
    """(splits, inputs a split) of an [.., k] x [k, n] GEMM: a function of the weight's shape."""
    b = INVARIANT
    parts = max(1, min(SPLIT_PROGRAMS // triton.cdiv(n, b.n), k // SPLIT_MIN_K))
    per = triton.cdiv(triton.cdiv(k, parts), b.k) * b.k  # whole BLOCK_K steps
    return triton.cdiv(k, per), per


def split_output(parts: int, out: torch.Tensor) -> torch.Tensor:
    """The fp32 shares of a split GEMM into `out` [m, n]; `out` itself when it does not split (the
    kernel then stores there and never touches the shares' pointer)."""
    return torch.empty((parts, *out.shape), dtype=torch.float32, device=out.device) if parts > 1 else out


def add_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    if part is not out:
        mn, block = out.numel(), 1024
        _split_sum_kernel[(triton.cdiv(mn, block),)](part, out, mn, SPLIT=part.shape[0], BLOCK=block)


def _linear_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    *lead, k = x.shape
    rows = x.reshape(-1, k).contiguous()
    weight = weight.contiguous()
    m, n = rows.shape[0], weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = INVARIANT
    parts, per = k_splits(n, k)
    part = split_output(parts, out)
    _linear_kernel[(triton.cdiv(m, b.m), triton.cdiv(n, b.n), parts)](
        rows, weight, out, part, m, n, k, per, rows.stride(0), weight.stride(0), out.stride(0),
        IEEE=_ieee(x), BM=b.m, BN=b.n, BK=b.k, SPLIT=parts, num_warps=b.warps,
    )  # fmt: skip
    add_splits(part, out)
    return out.view(*lead, n)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _linear_forward(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T, [..., K] x [N, K] -> [..., N] in x's dtype; each row as the same tile problem."""
    return _Linear.apply(x, weight)


class ExpertTiles(NamedTuple):
    """A grouped GEMM's row tiles over rows sorted by expert (`expert_tiles`), on the device."""

    counts: torch.Tensor  # [E] rows per expert
    expert: torch.Tensor  # [tiles] each tile's expert,
    start: torch.Tensor  # its first row (it takes BLOCK_M rows from there)
    end: torch.Tensor  # and its expert's end row, which masks the rest (end = start: a spare tile)


def expert_tiles(counts: torch.Tensor, rows: int, block_m: int | None = None) -> ExpertTiles:
    """The tiles of `rows` rows sorted by expert, counts [E] of them per expert (no host sync): as
    many tiles as such rows can ever need, the real ones first.

    Expert e's rows are ends[e] - counts[e] .. ends[e] - 1, in ceil(counts[e] / block_m) tiles, so
    there are at most rows // block_m + (experts with rows) <= rows // block_m + min(E, rows) tiles:
    each expert adds at most one part-filled tile. (`block_m` other than the mode's: `grouped_matmul`'s.)
    """
    block_m = block_m or INVARIANT.m
    experts = counts.numel()
    ends = counts.cumsum(0, dtype=torch.int32)
    per_expert = (counts + block_m - 1) // block_m
    tile_ends = per_expert.cumsum(0, dtype=torch.int32)
    tile = torch.arange(rows // block_m + min(experts, rows), dtype=torch.int32, device=counts.device)
    # the expert whose tiles hold `tile`: the first with tile_ends > tile (none for the spare tiles)
    expert = torch.searchsorted(tile_ends, tile, right=True, out_int32=True).clamp_(max=experts - 1)
    start = (ends - counts)[expert] + (tile - (tile_ends - per_expert)[expert]) * block_m
    end = torch.where(tile < tile_ends[-1], ends[expert], start)
    return ExpertTiles(counts, expert, start, end)


def grouped_matmul(
    x: torch.Tensor, weight: torch.Tensor, tiles: ExpertTiles, blocks: Blocks | None = None
) -> torch.Tensor:
    """`grouped_linear`'s forward (no autograd), at the mode's tiling or `blocks` (`tiles` built
    with blocks.m): the default engine's experts take it too (`kernels/moe.py`), where speed alone
    picks the tiles."""
    blocks = blocks or INVARIANT
    rows, k = x.shape
    n = weight.shape[1]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    x, weight = x.contiguous(), weight.contiguous()
    _grouped_linear_kernel[(tiles.expert.numel(), triton.cdiv(n, blocks.n))](
        x, weight, out, tiles.expert, tiles.start, tiles.end, n, k,
        x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        IEEE=_ieee(x), BM=blocks.m, BN=blocks.n, BK=blocks.k, num_warps=blocks.warps,
    )  # fmt: skip
    return out


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, *tiles):
        tiles = ExpertTiles(*tiles)
        ctx.save_for_backward(x, weight, tiles.counts)
        return grouped_matmul(x, weight, tiles)

    @staticmethod
    def backward(ctx, grad):
        x, weight, counts = ctx.saved_tensors
        sizes = counts.tolist()  # a host sync: backward is not captured in a graph
        grads = grad.split(sizes)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.cat([g @ weight[e] for e, g in enumerate(grads)])
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack([g.t() @ rows for g, rows in zip(grads, x.split(sizes), strict=True)])
        return grad_x, grad_w, *[None] * len(ExpertTiles._fields)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, tiles: ExpertTiles) -> torch.Tensor:
    """Each expert's rows times its weight^T: x [R, K] (rows sorted by expert), weight [E, N, K],
    `tiles` = expert_tiles(rows per expert, R) -> [R, N] in x's dtype. A row of expert e equals
    `linear(row, weight[e])` bit for bit, in any batch; no host sync."""
    return _GroupedLinear.apply(x, weight, *tiles)


def _causal_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, h, t, d = q.shape
    _check_head_dim(d)
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    _causal_kernel[(triton.cdiv(t, QUERY_ROWS), b * h)](
        q, k, v, out, t, h, h // k.shape[1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), d**-0.5,
        D=d, BM=QUERY_ROWS, BN=KEYS, IEEE=_ieee(q), num_warps=WARPS,
    )  # fmt: skip
    return out


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return _causal_forward(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = (x.detach().requires_grad_() for x in ctx.saved_tensors)
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(out, (q, k, v), grad)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over a batch: q [B,H,T,D], k and v [B,Hkv,T,D] -> [B,H,T,D]."""
    return _CausalAttention.apply(q, k, v)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """One query per slot: q [n,H,1,D] against slot i's cached keys 0..lengths[i]-1 (k_cache and
    v_cache [slots,Hkv,capacity,D]) -> [n,H,1,D]. No host sync: CUDA graphs capture it."""
    n, h, _, d = q.shape
    _check_head_dim(d)
    hkv = k_cache.shape[1]
    out = torch.empty_like(q)
    _decode_kernel[(n, hkv, triton.cdiv(h // hkv, QUERY_ROWS))](
        q, k_cache, v_cache, lengths, out, h // hkv,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), d**-0.5,
        D=d, BM=QUERY_ROWS, BN=KEYS, IEEE=_ieee(q), num_warps=WARPS,
    )  # fmt: skip
    return out


def write_kv(
    k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> None:
    """A decode step's keys and values (k, v [n,Hkv,1,D], any strides with D contiguous) into slots
    0..n-1 of one layer's cache ([slots,Hkv,capacity,D], the same dtype) at `positions` [n]: one
    launch for both, where indexed assignment takes two and a copy."""
    n, hkv, _, d = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    _write_kv_kernel[(n, hkv)](
        k, v, positions, k_cache, v_cache, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), D=d,
    )  # fmt: skip


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    rows = x.contiguous()
    out = torch.empty_like(rows)
    _rms_norm_kernel[(rows.numel() // n,)](
        rows, weight.contiguous(), out, n, eps, BLOCK=triton.next_power_of_2(n)
    )
    return out


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _rms_norm_forward(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = model_rms_norm(x, weight, ctx.eps)
        grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (`models/decoder.py`: normalise in fp32, round, scale), one program a row."""
    return _RMSNorm.apply(x, weight, eps)
