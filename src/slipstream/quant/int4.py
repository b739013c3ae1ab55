"""INT4 weights: group-wise symmetric int4, one fp32 scale per 128 inputs of a row (W4A16).

The layout (the wire's, the engine's and the W4A16 GEMM's; `kernels/w4a16.py` reads exactly this):

- A linear weight `w` is [out, in] with `in % 128 == 0` (GROUP = 128, groups run along the input
  dimension, so group g of row r is `w[r, 128*g : 128*(g+1)]`).
- `scales`: float32 [out, in // 128], `scale = max|w_group| / 7` computed in fp32 (an all-zero
  group gets scale 1.0: any positive scale reproduces zeros).
- Values: `q = clamp(round(w / scale), -7, 7)` (fp32 division, round half to even as
  `torch.round`), so -8 is never used and the code is symmetric.
- `packed`: uint8 [out, in // 2], two values a byte along the input dimension, low nibble first:
  `packed[r, i] = (q[r, 2i] + 8) | ((q[r, 2i + 1] + 8) << 4)`. Unpacking: `lo = (b & 15) - 8`,
  `hi = (b >> 4) - 8`.
- Dequantized: `w' = q * scale` in fp32, then cast to the caller's dtype.

Why this format. Half a byte a weight plus 4 bytes per 128 weights (4.25 bits a weight) is what
lets a rollout server hold a model four times its bf16 size. Symmetric groups of 128 along the
input dimension are the GPTQ/AWQ "W4A16" convention that GEMM kernels tile for, and the range
[-7, 7] keeps zero exactly representable and the code sign-symmetric. The trainer's INT4 QAT
(`services/trainer/quantized.py`) rounds with these same functions, so the weights it computes its
forward with are the weights the engine serves, bit for bit.
"""

from __future__ import annotations

import torch

GROUP = 128
INT4_MAX = 7


def check_shape(shape: tuple[int, ...] | torch.Size) -> None:
    """Raise ValueError unless `shape` is a [out, in] matrix int4 can hold (in a multiple of 128)."""
    if len(shape) != 2 or shape[1] % GROUP:
        raise ValueError(
            f"int4 quantization needs a 2-D [out, in] matrix with in a multiple of {GROUP}, "
            f"got shape {tuple(shape)}"
        )


def group_scales(w: torch.Tensor) -> torch.Tensor:
    """fp32 [out, in // 128]: max |w| / 7 per (row, group); 1.0 for an all-zero group."""
    check_shape(w.shape)
    out_f, in_f = w.shape
    amax = w.float().view(out_f, in_f // GROUP, GROUP).abs().amax(dim=2)
    return torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax))


def quantize_values(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] in [-7, 7]: clamp(round(w / scale), -7, 7) with `scales` from group_scales."""
    out_f, in_f = w.shape
    groups = w.float().view(out_f, in_f // GROUP, GROUP) / scales[:, :, None]
    return groups.round_().clamp_(-INT4_MAX, INT4_MAX).to(torch.int8).view(out_f, in_f)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] in [-8, 7] -> uint8 [out, in // 2], low nibble = even input index."""
    biased = (q.to(torch.int16) + 8).to(torch.uint8)
    return biased[:, 0::2] | (biased[:, 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`: uint8 [out, in // 2] -> int8 [out, in]."""
    lo = (packed & 15).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).view(packed.shape[0], packed.shape[1] * 2)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [out, in] matrix to (packed: uint8 [out, in // 2], scales: fp32 [out, in // 128])."""
    scales = group_scales(w)
    return pack(quantize_values(w, scales)), scales


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize_int4`: q * scale in fp32, then `dtype`."""
    out_f, half_in = packed.shape
    if packed.dtype != torch.uint8 or tuple(scales.shape) != (out_f, half_in * 2 // GROUP):
        raise ValueError(
            f"int4 packed {tuple(packed.shape)} {packed.dtype} and scales {tuple(scales.shape)} "
            f"do not fit: expected uint8 [out, in/2] and fp32 [out, in/{GROUP}]"
        )
    q = unpack(packed).float().view(out_f, -1, GROUP)
    return (q * scales.float()[:, :, None]).view(out_f, half_in * 2).to(dtype)


def fake_quantize_int4(w: torch.Tensor) -> torch.Tensor:
    """dequantize_int4(quantize_int4(w)) without packing, in w's dtype: the QAT forward's weights."""
    scales = group_scales(w)
    q = quantize_values(w, scales).float().view(w.shape[0], -1, GROUP)
    return (q * scales[:, :, None]).view(w.shape).to(w.dtype)
