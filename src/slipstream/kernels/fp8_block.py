"""FP8 128x128-block quantize and dequantize (the wire format of `quant/fp8.py`) as one Triton launch
per matrix, or one per weight version over a table of matrices.

Why. The plain-PyTorch recipe is ~8 kernels per matrix (pad, fp32 copy, abs, amax, divide,
clamp, cast, slice) and a weight version has ~200 matrices: on a GPU the launches, not the
bytes, set the time (about 30 ms of the 0.6B version's 39 ms to pack for CUDA IPC). Here one
program handles one block: load it, take its amax, scale, saturate, cast, store the block's
scale, so a matrix is one launch and one pass over memory each way.

A weight version is ~200 matrices, so even one launch per matrix leaves ~200 launches and their
Python on each side of a colocated sync. `quantize_many` / `dequantize_many` take the whole
version at once: a table with one row per matrix (where it is, its shape, where its FP8 bytes and
its scales go in the version's flat blob, its first block) and a block -> row map, so one program
per 128x128 block of any matrix runs in a single launch. Their per-block arithmetic is the
per-matrix kernels', line for line.

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
    def _quantize_block(
        x_ptr, q_ptr, s_ptr, bm, bn, M, N, stride_x, stride_q, n_col_blocks, BLOCK: tl.constexpr
    ):
        # The definition (quant.fp8.quantize_blockwise) for block (bm, bn): scale = amax / 448,
        # q = x / scale rounded to nearest, saturated; both kernels below run exactly this.
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
    def _dequantize_block(
        q_ptr, s_ptr, w_ptr, bm, bn, M, N, stride_q, stride_w, n_col_blocks, BLOCK: tl.constexpr
    ):
        rows = bm * BLOCK + tl.arange(0, BLOCK)
        cols = bn * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(s_ptr + bm * n_col_blocks + bn)
        w = q * scale
        tl.store(w_ptr + rows[:, None] * stride_w + cols[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quantize_kernel(x_ptr, q_ptr, s_ptr, M, N, stride_x, stride_q, n_col_blocks, BLOCK: tl.constexpr):
        bm, bn = tl.program_id(0), tl.program_id(1)
        _quantize_block(x_ptr, q_ptr, s_ptr, bm, bn, M, N, stride_x, stride_q, n_col_blocks, BLOCK)

    @triton.jit
    def _dequantize_kernel(q_ptr, s_ptr, w_ptr, M, N, stride_q, stride_w, n_col_blocks, BLOCK: tl.constexpr):
        bm, bn = tl.program_id(0), tl.program_id(1)
        _dequantize_block(q_ptr, s_ptr, w_ptr, bm, bn, M, N, stride_q, stride_w, n_col_blocks, BLOCK)

    @triton.jit
    def _block_of(row, pid, ALIGNED: tl.constexpr):
        # Program `pid`'s block of a many-kernel launch, from its matrix's table row (7 int64:
        # three offsets, then M, N, column blocks, the matrix's first block in the launch):
        # M, N, the column-block count and the block's (row, column) in its matrix.
        M, N, n_col_blocks = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
        if ALIGNED:
            N = N * 16
        local = pid - tl.load(row + 6)
        return M, N, n_col_blocks, local // n_col_blocks, local % n_col_blocks

    @triton.jit
    def _quantize_many_kernel(table_ptr, block_row_ptr, blob_ptr, src_ref_ptr, ALIGNED: tl.constexpr,
                              BLOCK: tl.constexpr):  # fmt: skip
        # table row: source address, q and scale offsets in the blob (in 64-byte units), M, N (in
        # units of 16 when ALIGNED), column blocks, first block of this matrix in the launch. The
        # units let the compiler prove the alignment its 16-byte accesses need.
        pid = tl.program_id(0)
        row = table_ptr + tl.load(block_row_ptr + pid).to(tl.int64) * 7
        x_ptr = tl.load(row).to(tl.pointer_type(src_ref_ptr.dtype.element_ty))
        q_ptr = (blob_ptr + tl.load(row + 1) * 64).to(tl.pointer_type(tl.float8e4nv))
        s_ptr = (blob_ptr + tl.load(row + 2) * 64).to(tl.pointer_type(tl.float32))
        M, N, n_col_blocks, bm, bn = _block_of(row, pid, ALIGNED)
        _quantize_block(x_ptr, q_ptr, s_ptr, bm, bn, M, N, N, N, n_col_blocks, BLOCK)

    @triton.jit
    def _dequantize_many_kernel(table_ptr, block_row_ptr, blob_ptr, out_ptr, ALIGNED: tl.constexpr,
                                BLOCK: tl.constexpr):  # fmt: skip
        # table row: q and scale offsets in the blob and the output offset (in units of 64 bytes,
        # 64 elements), M, N (in units of 16 when ALIGNED), column blocks, first block of this matrix
        pid = tl.program_id(0)
        row = table_ptr + tl.load(block_row_ptr + pid).to(tl.int64) * 7
        q_ptr = (blob_ptr + tl.load(row) * 64).to(tl.pointer_type(tl.float8e4nv))
        s_ptr = (blob_ptr + tl.load(row + 1) * 64).to(tl.pointer_type(tl.float32))
        w_ptr = out_ptr + tl.load(row + 2) * 64
        M, N, n_col_blocks, bm, bn = _block_of(row, pid, ALIGNED)
        _dequantize_block(q_ptr, s_ptr, w_ptr, bm, bn, M, N, N, N, n_col_blocks, BLOCK)


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


def _launch_table(
    rows: list[list[int]], counts: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(table [matrices, 7] int64, block -> table row [blocks] int32) on `device`, for the many-kernels."""
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    per_block = torch.repeat_interleave(
        torch.arange(len(rows), dtype=torch.int32, device=device),
        torch.tensor(counts, dtype=torch.int64).to(device, non_blocking=True),
        output_size=sum(counts),
    )
    return table, per_block


def _in_units_of_16(rows: list[list[int]]) -> bool:
    """When every N (column 4) is a multiple of 16, store it in units of 16 (the kernels' ALIGNED)."""
    if any(r[4] % 16 for r in rows):
        return False
    for r in rows:
        r[4] //= 16
    return True


def many_available(blob: torch.Tensor) -> bool:
    return triton is not None and blob.is_cuda and blob.dtype == torch.uint8 and blob.is_contiguous()


def quantize_many(blob: torch.Tensor, jobs: list[tuple[torch.Tensor, int, int]]) -> None:
    """Quantize every `(matrix, q_offset, scale_offset)` into the uint8 CUDA `blob`, in one launch:
    the FP8 values at q_offset (row-major), the fp32 scale_inv at scale_offset (both 64-byte aligned).
    The matrices are 2-D on the blob's device, of one dtype."""
    if not jobs:
        return
    dtype = jobs[0][0].dtype
    rows, counts, keep, first = [], [], [], 0
    for w, q_off, s_off in jobs:
        if w.dim() != 2 or w.dtype != dtype or w.device != blob.device or q_off % 64 or s_off % 64:
            raise ValueError("quantize_many: 2-D matrices of one dtype on the blob's device, 64-byte offsets")
        w = w.contiguous()
        keep.append(w)  # alive until the launch is queued
        m, n = w.shape
        blocks = _grid(m, n)
        rows.append([w.data_ptr(), q_off // 64, s_off // 64, m, n, blocks[1], first])
        counts.append(blocks[0] * blocks[1])
        first += counts[-1]
    if not first:
        return
    aligned = _in_units_of_16(rows)
    table, per_block = _launch_table(rows, counts, blob.device)
    _quantize_many_kernel[(first,)](table, per_block, blob, keep[0], ALIGNED=aligned, BLOCK=BLOCK)


def dequantize_many(
    blob: torch.Tensor, specs: list[tuple[int, int, tuple[int, int]]], dtype: torch.dtype
) -> list[torch.Tensor]:
    """Dequantize every `(q_offset, scale_offset, (M, N))` of the uint8 CUDA `blob` in one launch;
    returns the matrices in `dtype`, each a view into one new buffer."""
    rows, counts, out_offsets, first, total = [], [], [], 0, 0
    for q_off, s_off, (m, n) in specs:
        if q_off % 64 or s_off % 64:
            raise ValueError("dequantize_many: q and scale offsets must be 64-byte aligned")
        blocks = _grid(m, n)
        rows.append([q_off // 64, s_off // 64, total // 64, m, n, blocks[1], first])
        counts.append(blocks[0] * blocks[1])
        out_offsets.append(total)
        first += counts[-1]
        total += -(-(m * n) // 64) * 64  # each matrix starts 64 elements aligned
    out = torch.empty(total, dtype=dtype, device=blob.device)
    if first:
        aligned = _in_units_of_16(rows)
        table, per_block = _launch_table(rows, counts, blob.device)
        _dequantize_many_kernel[(first,)](table, per_block, blob, out, ALIGNED=aligned, BLOCK=BLOCK)
    return [out[off : off + m * n].view(m, n) for off, (_, _, (m, n)) in zip(out_offsets, specs, strict=True)]
