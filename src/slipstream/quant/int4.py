"""INT4 weights: group-wise symmetric int4, one fp32 scale per 128 inputs of a row (W4A16).

The layout (the wire's, the engine's and the W4A16 GEMM's; `kernels/w4a16.py` reads exactly this):

- A linear weight `w` is [out, in] with `in % 128 == 0` (GROUP = 128, groups run along the input
  dimension, so group g of row r is `w[r, 128*g : 128*(g+1)]`). Stacked MoE experts [E, out, in]
  are E such matrices: every shape below gains the leading E.
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

import re
from collections.abc import Iterable, Sequence

import torch

from slipstream.quant.fp8 import LINEAR_WEIGHT

GROUP = 128
INT4_MAX = 7


def check_shape(shape: tuple[int, ...] | torch.Size) -> None:
    """Raise ValueError unless `shape` is [..., out, in] with in a multiple of 128."""
    if len(shape) < 2 or shape[-1] % GROUP:
        raise ValueError(
            f"int4 quantization needs a [..., out, in] matrix with in a multiple of {GROUP}, "
            f"got shape {tuple(shape)}"
        )


def _groups(w: torch.Tensor) -> torch.Tensor:
    """[..., in] fp32 -> [..., in // 128, 128]."""
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // GROUP, GROUP)


def group_scales(w: torch.Tensor) -> torch.Tensor:
    """fp32 [..., out, in // 128]: max |w| / 7 per (row, group); 1.0 for an all-zero group."""
    check_shape(w.shape)
    amax = _groups(w).abs().amax(dim=-1)
    return torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax))


def quantize_values(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 [..., out, in] in [-7, 7]: clamp(round(w / scale), -7, 7), `scales` from group_scales."""
    q = (_groups(w) / scales[..., None]).round_().clamp_(-INT4_MAX, INT4_MAX)
    return q.to(torch.int8).reshape(w.shape)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., in] in [-8, 7] -> uint8 [..., in // 2], low nibble = even input index."""
    biased = (q.to(torch.int16) + 8).to(torch.uint8)
    return biased[..., 0::2] | (biased[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., in // 2] -> int8 [..., in]."""
    lo = (packed & 15).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def packed_shapes(shape: tuple[int, ...] | torch.Size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(packed shape, scales shape) of a [..., out, in] weight."""
    check_shape(shape)
    lead, in_f = tuple(shape[:-1]), shape[-1]
    return lead + (in_f // 2,), lead + (in_f // GROUP,)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] -> (packed: uint8 [..., out, in // 2], scales: fp32 [..., out, in // 128])."""
    scales = group_scales(w)
    return pack(quantize_values(w, scales)), scales


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize_int4`: q * scale in fp32, then `dtype`."""
    lead, half_in = tuple(packed.shape[:-1]), packed.shape[-1]
    if packed.dtype != torch.uint8 or tuple(scales.shape) != lead + (half_in * 2 // GROUP,):
        raise ValueError(
            f"int4 packed {tuple(packed.shape)} {packed.dtype} and scales {tuple(scales.shape)} "
            f"do not fit: expected uint8 [..., out, in/2] and fp32 [..., out, in/{GROUP}]"
        )
    q = _groups(unpack(packed))
    return (q * scales.float()[..., None]).reshape(*lead, half_in * 2).to(dtype)


def fake_quantize_int4(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequantize_int4(*quantize_int4(w), dtype) without packing (dtype defaults to w's): the
    weights the QAT forward computes with, equal bit for bit to what the engine serves."""
    scales = group_scales(w)
    q = _groups(quantize_values(w, scales))
    return (q * scales[..., None]).reshape(w.shape).to(dtype or w.dtype)


# ---- which weights are int4 ---------------------------------------------------------------------

TARGETS = ("auto", "linear", "experts")
# Routed experts, stacked ([E, out, in], `models/moe.py`) or one matrix per expert (HF names).
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+\.)?(gate_up_proj|gate_proj|up_proj|down_proj)(\.weight)?$")


def int4_names(named_shapes: Iterable[tuple[str, Sequence[int]]], targets: str) -> set[str]:
    """The tensors that are int4 (trained with --int4-qat, packed by --weight-sync-dtype int4,
    served W4A16), by --int4-qat-targets:

    - "linear": every linear projection of the decoder (q/k/v/o, gate/up/down: `should_quantize`'s
      set; never the embeddings, the LM head, norms or MoE routers);
    - "experts": the routed experts' projections only;
    - "auto": "experts" when the model has routed experts, else "linear".

    A matrix whose input dimension is not a multiple of 128 stays as it is (no group fits it)."""
    if targets not in TARGETS:
        raise ValueError(f"int4 targets must be one of {TARGETS}, got {targets!r}")
    shapes = {name: tuple(int(d) for d in shape) for name, shape in named_shapes}
    experts = {n for n, s in shapes.items() if _EXPERT.search(n) and len(s) in (2, 3)}
    if targets == "auto":
        targets = "experts" if experts else "linear"
    chosen = (
        experts
        if targets == "experts"
        else experts | {n for n, s in shapes.items() if len(s) == 2 and LINEAR_WEIGHT.search(n)}
    )
    return {n for n in chosen if shapes[n][-1] % GROUP == 0}
