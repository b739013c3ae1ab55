"""FP8 linear layers for the rollout engine: e4m3 weights with one scale per output row,
activations quantized per token as they arrive.

Why row-wise and not the wire's 128x128 blocks. Hopper's FP8 GEMM in PyTorch (`torch._scaled_mm`)
takes one scale per row of A and one per column of B: per-token scales for the activations and
per-output-channel scales for the weights. Block scales would need a different kernel (DeepGEMM),
so a block-quantized update (`quant/fp8.py`) is re-quantized once per row when it is loaded. The
row scale is the largest of that row's block scales, so each weight moves by at most one more
e4m3 rounding; the engine pays it once per weight version, never per token.

Why per-token activation scales. Decode batches mix sequences whose hidden states differ by
orders of magnitude; one scale per token keeps each row's own range. Computing them costs one
pass over the activations, which is tiny next to the weight read it halves.

The fallback (CPU, older GPUs) computes the same function in fp32: dequantize both operands and
multiply. `tests/test_kernels.py` pins the two against each other and against the bf16 layer.
"""

from __future__ import annotations

import torch
from torch import nn

from slipstream.quant import FP8_DTYPE, FP8_MAX, should_quantize

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_TINY = 1e-12  # an all-zero row gets this amax, so its scale is positive and its values stay 0


def scaled_mm_supported(device: torch.device) -> bool:
    """True where `torch._scaled_mm` runs FP8 on tensor cores (compute capability >= 8.9)."""
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


def fp8_matmul(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """(xq * x_scale) @ (wq * w_scale).T: xq [M, K], x_scale [M, 1], wq [N, K], w_scale [N, 1] -> [M, N]."""
    if scaled_mm_supported(xq.device) and xq.shape[1] % 16 == 0 and wq.shape[0] % 16 == 0:
        # Row-wise scaling wants bf16 output; B must be column-major, which wq.t() is.
        out = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16)
        return out.to(out_dtype)
    return ((xq.float() * x_scale) @ (wq.float() * w_scale).t()).to(out_dtype)


class Fp8Linear(nn.Module):
    """An `nn.Linear` whose weight is held as e4m3 with a float32 scale per output row. A bias
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
            torch.ones((out_features, 1), dtype=torch.float32, device=device),
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
        """Re-quantize a full-precision [out, in] weight into this layer's buffers, in place (so a
        CUDA graph that reads them sees the new version)."""
        q, scale = quantize_rows(w.to(self.weight.device))
        self.weight.copy_(q)
        self.weight_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        out = fp8_matmul(xq, x_scale, self.weight, self.weight_scale, x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
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
