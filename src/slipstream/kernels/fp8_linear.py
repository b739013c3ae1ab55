"""FP8 linear layers for the rollout engine: e4m3 weights with the wire's 128x128 block scales,
activations quantized per token as they arrive.

Why the wire's blocks, as they are. The trainer pushes each projection as e4m3 values with one
fp32 scale per 128x128 block (`quant/fp8.py`, DeepSeek-V3's recipe), and with unified FP8 it
computes its own forward with exactly those numbers. Re-quantizing them per output row (what
`torch._scaled_mm`'s row-wise mode needs) would round a second time, so the rollout would sample
from weights the trainer never saw. The layer keeps the blocks: values as they are, each block's
scale repeated over its 128 rows (`weight_scale` [out, ceil(in/128)], one scale per row and
128-wide input step, which also lets q|k|v or gate|up be fused whatever their row counts), and
`kernels/fp8_gemm.py` multiplies with them on FP8 tensor cores, 128 inputs at a time.

Why per-token activation scales. Decode batches mix sequences whose hidden states differ by
orders of magnitude; one scale per token keeps each row's own range. Computing them costs one
pass over the activations, which is tiny next to the weight read it halves, and the fused decode
folds it into its norm and SiLU kernels.

From `CUBLAS_FROM_M` tokens on, the product goes to cuBLAS's block-scaled `torch._scaled_mm` on the
same numbers. It reads the weight's scales as [K/128, N/128] blocks and each token's scale
repeated over its 128-wide groups, group-major. The first are derived once per scale buffer and
kept (re-read in place when a weight update writes the buffer, so a CUDA graph that captured them
computes with the new version); the second the quantize step writes in that layout as it makes
them (`new_row_scales`). A decode step pays no scale copies for either where its quantize steps
do so (the fused norm/SiLU kernels of `kernels/decode_layer.py` still write [M, 1], copied once
per GEMM).

The fallback (CPU, GPUs without FP8 tensor cores) computes the same function in fp32: dequantize
both operands and multiply. `tests/test_kernels.py` and `tests/test_kernels_fp8_gemm.py` pin the
two against each other and against the bf16 layer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from slipstream.kernels import fp8_gemm
from slipstream.kernels.gemm_plan import GROUP_K
from slipstream.quant import BLOCK, FP8_DTYPE, FP8_MAX, quantize_blockwise, scale_shape, should_quantize

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_TINY = 1e-12  # an all-zero row gets this amax, so its scale is positive and its values stay 0


def scaled_mm_supported(device: torch.device) -> bool:
    """True where FP8 GEMMs run on tensor cores (compute capability >= 8.9)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        M,
        K,
        stride_x,
        GROUPS: tl.constexpr,
        GROUPS_P2: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=mask)
        # the scale once per 128-wide group, group-major ([GROUPS, M]): cuBLAS's 1x128 layout
        groups = tl.arange(0, GROUPS_P2)
        tl.store(s_ptr + groups * M + row, tl.zeros_like(groups.to(tl.float32)) + scale, mask=groups < GROUPS)


def new_row_scales(m: int, k: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Where a quantize kernel writes the per-token scales of an [m, k] activation: (scale [m, 1]
    fp32, groups). The kernel stores token r's scale at scale_ptr + j * m + r for j < groups. With
    groups > 1 (the next GEMM takes cuBLAS's route: `CUBLAS_FROM_M`) the scale carries
    `group_scales`, the [m, ceil(k/128)] view cuBLAS reads (each token's scale over its 128-wide
    groups, group-major), so the GEMM needs no copy of it; `scale` is that buffer's first group."""
    starts = [t for t in (CUBLAS_FROM_M, CUBLAS_SMALL_FROM_M) if t is not None]
    groups = scale_shape((1, k))[1] if starts and m >= min(starts) else 1
    buffer = torch.empty((groups, m), dtype=torch.float32, device=device)
    scale = buffer[0].unsqueeze(1)
    if groups > 1:
        scale.group_scales = buffer.t()
    return scale, groups


def _quantize_rows_triton(x: torch.Tensor, scale: torch.Tensor, groups: int) -> torch.Tensor:
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](
        x, q, scale, m, k, x.stride(0), GROUPS=groups, GROUPS_P2=triton.next_power_of_2(groups), BLOCK=block
    )
    return q


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [M, K] matrix row by row: (q float8_e4m3fn [M, K], scale float32 [M, 1]), x ~= q * scale.

    On CUDA one Triton pass (a decode step quantizes four activations per layer: one launch each
    instead of six), which also lays the scales out for cuBLAS where the GEMM will go there
    (`new_row_scales`); elsewhere the same arithmetic in PyTorch."""
    if triton is not None and x.is_cuda and x.stride(-1) == 1 and x.shape[-1] <= 16384:
        scale, groups = new_row_scales(*x.shape, x.device)
        return _quantize_rows_triton(x, scale, groups), scale
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=_TINY) / FP8_MAX
    q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


# From this many tokens on, FP8 GEMMs whose weight scales are whole 128x128 blocks go to cuBLAS
# (`torch._scaled_mm` with 1x128 activation and 128x128 weight scales) instead of our Triton
# kernel; None: never. Its numerics were checked on the H200 (torch 2.11, CUDA 13:
# tests/test_kernels_fp8_gemm.py's cuBLAS tests, M = 16..256 taken, within 5e-3 of the
# dequantized product, and under a CUDA graph across a weight update; it refuses M = 1, which
# stays Triton). On the H200 (docs/benchmarks.md, issue 16, the Qwen3-8B shape) it makes the decode
# at batch 256 1.25-1.28x bf16 (Triton: 0.90-0.93x) since neither the weight's nor the tokens'
# scales cost a copy per GEMM (session 11, with the copies: 1.21x), and batch 64 slower (1.05x
# against Triton's 1.25x), so it starts at 256.
CUBLAS_FROM_M: int | None = 256
# From this many tokens on, the GEMMs of at most CUBLAS_SMALL_WEIGHTS weights (N * K) go to cuBLAS
# too (None: never). Alone at M = 64 cuBLAS's block-wise GEMM timed faster than ours for the 8B
# shape's q|k|v and o (19 / 18 against 31 / 41 us); in the decode step it lost (session 12, from
# 16: 1.21x bf16 at batch 16 against 1.32x, 1.20x at 64 against 1.24x), so it stays off.
CUBLAS_SMALL_FROM_M: int | None = None
CUBLAS_SMALL_WEIGHTS = 32 << 20
_scaled_mm_failed: set[tuple[torch.device, int, int, int]] = set()  # (device, M, N, K) cuBLAS refused


@dataclass
class _Blocks:
    """The cuBLAS route's view of one [N, ceil(K/128)] weight scale buffer."""

    owner: weakref.ref  # the buffer (a later tensor at its address is another buffer)
    version: int  # the buffer's version counter when `scales` was last read from it
    scales: torch.Tensor | None  # [K/128, N/128] as cuBLAS reads them; None: not whole blocks


_blocks: dict[tuple[int, tuple[int, ...]], _Blocks] = {}


def _version(t: torch.Tensor) -> int:
    return 0 if t.is_inference() else t._version  # inference tensors count no writes


def _read_blocks(entry: _Blocks, w_scale: torch.Tensor) -> None:
    if entry.scales is not None:  # in place: a CUDA graph that captured them reads the new ones
        entry.scales.t().copy_(w_scale[::BLOCK])
    entry.version = _version(w_scale)


def _forget(key: tuple[int, tuple[int, ...]], owner: weakref.ref) -> None:
    entry = _blocks.get(key)
    if entry is not None and entry.owner is owner:  # not a later buffer's entry at the same address
        del _blocks[key]


def _block_scales(w_scale: torch.Tensor) -> torch.Tensor | None:
    """The wire's 128x128 block scales behind a [N, ceil(K/128)] weight scale, as cuBLAS reads them
    ([K/128, N/128], the transpose of a contiguous [N/128, K/128]), or None where its rows do not
    repeat whole 128x128 blocks (distinct row scales, [N, 1] ones, N not a multiple of 128).

    Read once per buffer, eagerly (the engine runs every step eagerly before capturing it), and
    kept: a copy per call was a kernel per GEMM in the decode graph (144 a step on the 8B shape).
    Whether the rows are whole blocks is the layout's (what `Fp8Linear.load_blocks_` stores, and
    q|k|v or gate|up fused from parts whose row counts are multiples of 128), decided on the
    first read. The values follow the buffer: `Fp8Linear.load_blocks_` re-reads them in
    place after a weight update (`refresh_block_scales`), and an eager call that finds the
    buffer's version counter moved since re-reads them too. Under capture an unseen or changed
    buffer answers None (the Triton kernel: the same function from the buffer itself)."""
    n = w_scale.shape[0]
    if w_scale.shape[1] == 1 or n % BLOCK:
        return None
    key = (w_scale.data_ptr(), tuple(w_scale.shape))
    entry = _blocks.get(key)
    if entry is not None and entry.owner() is w_scale and entry.version == _version(w_scale):
        return entry.scales
    if w_scale.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    if entry is None or entry.owner() is not w_scale:
        blocks = w_scale[::BLOCK]
        whole = bool(torch.equal(w_scale, blocks.repeat_interleave(BLOCK, 0)))
        scales = torch.empty(blocks.shape, dtype=blocks.dtype, device=blocks.device).t() if whole else None
        entry = _blocks[key] = _Blocks(weakref.ref(w_scale, lambda ref: _forget(key, ref)), -1, scales)
    _read_blocks(entry, w_scale)
    return entry.scales


@torch.no_grad()
def refresh_block_scales(w_scale: torch.Tensor) -> None:
    """Re-read the cuBLAS route's block scales of `w_scale` (or of the buffer it is a view of, as a
    fused q|k|v layer's scales are) after an in-place write."""
    for t in (w_scale, w_scale._base):
        entry = None if t is None else _blocks.get((t.data_ptr(), tuple(t.shape)))
        if entry is not None and entry.owner() is t:
            _read_blocks(entry, t)


def _scaled_mm_blocks(xq, x_scale, wq, b_scale, out_dtype) -> torch.Tensor | None:
    """cuBLAS's block-scaled FP8 GEMM on the same numbers: each token's one scale repeated over its
    128-wide groups (1x128), the wire's 128x128 weight blocks (`_block_scales`). The token scales
    come in that layout from `quantize_rows` (`group_scales`); others are copied into it. None
    where this torch/cuBLAS refuses the shape (found on its first, eager, call and remembered:
    torch 2.11 + CUDA 13 on an H200 refuses M = 1 and takes M = 16..256)."""
    shape = (xq.device, xq.shape[0], wq.shape[0], xq.shape[1])
    if shape in _scaled_mm_failed:
        return None
    m, steps = xq.shape[0], b_scale.shape[0]
    a_scale = getattr(x_scale, "group_scales", None)
    if a_scale is None or a_scale.shape != (m, steps):
        a_scale = x_scale.reshape(1, m).expand(steps, m).contiguous().t()  # [M, K/128], M-major
    try:
        return torch._scaled_mm(xq, wq.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)
    except (RuntimeError, ValueError, NotImplementedError):
        if torch.cuda.is_current_stream_capturing():
            raise
        _scaled_mm_failed.add(shape)
        return None


def _takes_cublas(m: int, k: int, n: int) -> bool:
    if CUBLAS_FROM_M is not None and m >= CUBLAS_FROM_M:
        return True
    return CUBLAS_SMALL_FROM_M is not None and m >= CUBLAS_SMALL_FROM_M and n * k <= CUBLAS_SMALL_WEIGHTS


def fp8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(xq * x_scale) @ (wq * w_scale).T (+ bias): xq [M, K], x_scale [M, 1], wq [N, K], and w_scale
    [N, 1] (one scale per row) or [N, ceil(K/128)] (one per row and 128-wide input step) -> [M, N]."""
    if fp8_gemm.available(xq):
        b_scale = _block_scales(w_scale) if _takes_cublas(*xq.shape, wq.shape[0]) else None
        if b_scale is not None:
            out = _scaled_mm_blocks(xq, x_scale, wq, b_scale, out_dtype)
            if out is not None:
                return out if bias is None else out + bias
        return fp8_gemm.fp8_block_matmul(xq, x_scale, wq, w_scale, out_dtype, bias)
    if w_scale.shape[1] > 1:
        w_scale = w_scale.repeat_interleave(GROUP_K, dim=1)[:, : wq.shape[1]]
    out = (xq.float() * x_scale) @ (wq.float() * w_scale).t()
    return (out if bias is None else out + bias.float()).to(out_dtype)


class Fp8Linear(nn.Module):
    """An `nn.Linear` whose weight is held as e4m3 with the wire's 128x128 block scales. A bias
    (Qwen2's q/k/v) stays a parameter in the model's dtype, added after the FP8 product; it keeps
    its Hugging Face name, so weight updates copy into it like any other parameter."""

    def __init__(
        self, in_features: int, out_features: int, device: torch.device, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.zeros((out_features, in_features), dtype=FP8_DTYPE, device=device)
        )
        # Not in the state dict: the engine keeps the checkpoint's names and shapes, which weight
        # updates are checked against.
        self.register_buffer(
            "weight_scale",
            torch.ones((out_features, scale_shape((out_features, in_features))[1]), device=device),
            persistent=False,
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.weight.device, linear.bias)
        layer.load_(linear.weight)
        return layer

    @torch.no_grad()
    def load_(self, w: torch.Tensor) -> None:
        """Quantize a full-precision [out, in] weight with the wire's blocks (`quantize_blockwise`)
        into this layer's buffers, in place (so a CUDA graph that reads them sees the new version)."""
        self.load_blocks_(*quantize_blockwise(w.to(self.weight.device)))

    @torch.no_grad()
    def load_blocks_(self, q: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Take block-quantized weights (the wire's e4m3 values and [ceil(out/128), ceil(in/128)]
        scales) as they are: no second rounding."""
        self.weight.copy_(q)
        self.weight_scale.copy_(scale_inv.repeat_interleave(BLOCK, dim=0)[: self.out_features])
        refresh_block_scales(self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        out = fp8_matmul(xq, x_scale, self.weight, self.weight_scale, x.dtype, self.bias)
        return out.view(*lead, self.out_features)


def convert_to_fp8(model: nn.Module) -> dict[str, Fp8Linear]:
    """Swap every linear projection (`quant.should_quantize`) for an `Fp8Linear`, in place.

    Returns the new layers by their weight's Hugging Face name, which is how updates address them.
    """
    swapped: dict[str, Fp8Linear] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and should_quantize(name + ".weight", child.weight):
                layer = Fp8Linear.from_linear(child)
                setattr(parent, child_name, layer)
                swapped[name + ".weight"] = layer
    return swapped
