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

The fallback (CPU, GPUs without FP8 tensor cores) computes the same function in fp32: dequantize
both operands and multiply. `tests/test_kernels.py` and `tests/test_kernels_fp8_gemm.py` pin the
two against each other and against the bf16 layer.
"""

from __future__ import annotations

import weakref

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
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [M, K] matrix row by row: (q float8_e4m3fn [M, K], scale float32 [M, 1]), x ~= q * scale.

    On CUDA one Triton pass (a decode step quantizes four activations per layer: one launch each
    instead of six); elsewhere the same arithmetic in PyTorch."""
    if triton is not None and x.is_cuda and x.stride(-1) == 1 and x.shape[-1] <= 16384:
        m, k = x.shape
        q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), BLOCK=triton.next_power_of_2(k))
        return q, scale
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=_TINY) / FP8_MAX
    q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


# From this many tokens on, FP8 GEMMs whose weight scales are whole 128x128 blocks go to cuBLAS
# (`torch._scaled_mm` with 1x128 activation and 128x128 weight scales) instead of our Triton
# kernel; None: never. On the H200 (docs/benchmarks.md, issue 16) it made the Qwen3-8B shape's
# decode at batch 256 1.18-1.20x bf16 (Triton: 0.90-0.93x) and batch 64 slower (0.99-1.01x
# against 1.20-1.22x), so it starts at 256. Its numerics were checked on the H200 (torch 2.11,
# CUDA 13: tests/test_kernels_fp8_gemm.py's cuBLAS test, cuBLAS taking M = 64 and 256 on the 0.6B
# and 8B shapes, within 5e-3 of the dequantized product; it refuses M = 1, which stays Triton).
CUBLAS_FROM_M: int | None = 256
_blocks_verdict: dict[tuple[int, tuple[int, ...]], tuple[weakref.ref, bool]] = {}
_scaled_mm_failed: set[tuple[torch.device, int, int, int]] = set()  # (device, M, N, K) cuBLAS refused


def _whole_blocks(w_scale: torch.Tensor) -> bool:
    """Whether a [N, ceil(K/128)] weight scale repeats each 128x128 block's scale over its 128
    rows (what `Fp8Linear.load_blocks_` stores, and q|k|v or gate|up fused from parts whose row
    counts are multiples of 128), so the blocks can be read back as [N/128, K/128]. Decided once
    per buffer, eagerly (the engine runs every step eagerly before capturing it); weight updates
    write the wire's blocks into the same buffers, so the verdict holds. Under capture an unseen
    buffer answers False."""
    n = w_scale.shape[0]
    if w_scale.shape[1] == 1 or n % BLOCK:
        return False
    key = (w_scale.data_ptr(), tuple(w_scale.shape))
    seen = _blocks_verdict.get(key)
    if seen is not None and seen[0]() is w_scale:  # the same tensor, not a later one at its address
        return seen[1]
    if w_scale.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    verdict = bool(torch.equal(w_scale, w_scale[::BLOCK].repeat_interleave(BLOCK, 0)))
    _blocks_verdict[key] = (weakref.ref(w_scale), verdict)
    return verdict


def _scaled_mm_blocks(xq, x_scale, wq, w_scale, out_dtype) -> torch.Tensor | None:
    """cuBLAS's block-scaled FP8 GEMM on the same numbers: each token's one scale repeated over its
    128-wide groups (1x128), the wire's 128x128 weight blocks. None where this torch/cuBLAS refuses
    the shape (found on its first, eager, call and remembered: torch 2.11 + CUDA 13 on an H200
    refuses M = 1 and takes M = 16..256)."""
    shape = (xq.device, xq.shape[0], wq.shape[0], xq.shape[1])
    if shape in _scaled_mm_failed:
        return None
    m, steps = xq.shape[0], w_scale.shape[1]
    a_scale = x_scale.reshape(1, m).expand(steps, m).contiguous().t()  # [M, K/128], M-major
    b_scale = w_scale[::BLOCK].contiguous().t()  # [K/128, N/128]
    try:
        return torch._scaled_mm(xq, wq.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)
    except (RuntimeError, ValueError, NotImplementedError):
        if torch.cuda.is_current_stream_capturing():
            raise
        _scaled_mm_failed.add(shape)
        return None


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
        if CUBLAS_FROM_M is not None and xq.shape[0] >= CUBLAS_FROM_M and _whole_blocks(w_scale):
            out = _scaled_mm_blocks(xq, x_scale, wq, w_scale, out_dtype)
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
