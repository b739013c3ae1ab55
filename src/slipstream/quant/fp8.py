"""FP8 block quantization, the DeepSeek-V3 recipe: e4m3 values, one fp32 scale per 128x128 block.

Why this format. Weight pushes are the largest thing Slipstream moves: every
`--update-weights-interval` steps the whole policy goes from the trainer through the coordinator
to every rollout server. One byte per weight halves the bf16 traffic, and the layout is the one
DeepSeek-V3 checkpoints (and SGLang's FP8 GEMMs) already consume, so an engine can run on the
bytes it receives without re-quantizing.

Why blocks, and why e4m3. A single scale per matrix lets one outlier crush every small weight
into e4m3's subnormals; one scale per output row does not help the input dimension. A 128x128
tile bounds the damage of an outlier to 16k weights and maps onto the tiles FP8 GEMM kernels
load anyway. e4m3 (3 mantissa bits, max 448, no infinities: the "fn" variant) trades range for
precision, which is the right trade for weights: each block is scaled so its largest magnitude
lands exactly on 448, so range is never the problem and precision is what is left.

What the numbers promise. For a block with scale s = amax / 448, every weight x with
|x| >= 2^-6 * s (a normal e4m3 number after scaling) is reproduced with relative error at most
2^-4 (half of e4m3's 2^-3 relative step); smaller weights land on the subnormal grid, whose
step is 2^-9 * s, so their absolute error is at most 2^-10 * s. In both cases the error is
below 2^-3 * amax of the block, the bound the tests pin.

Stored as `scale_inv` (w ~= q * scale_inv), shape [ceil(out/128), ceil(in/128)]: edge blocks may
be partial, because the small demo model has matrices narrower than one block.

Stacked MoE experts. Our MoE model holds its routed experts as one [E, out, in] tensor per
projection (`models/moe.py`), and on an MoE model they are nearly all the bytes (>90% of
Qwen3-30B-A3B). They are E matrices side by side: each expert gets its own 128x128 blocks (a block
never straddles two experts) and `scale_inv` is [E, ceil(out/128), ceil(in/128)], exactly the
per-expert quantization stacked, as DeepSeek-V3 checkpoints store one matrix per expert.

On CUDA both directions run as one Triton launch per matrix (`kernels/fp8_block.py`, the same
numbers bit for bit); stacked experts whose `out` is a multiple of 128 (every real model's) are one
[E*out, in] matrix to those kernels, whose blocks are then exactly the per-expert ones, others one
launch per expert. The PyTorch code below is the definition and the CPU path.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

# Linear projections of attention and MLP (dense and MoE experts, HF Llama/Qwen naming, plus
# the fused variants some checkpoints use). Embeddings, lm_head, norms and MoE routers are left
# out on purpose: they are small or precision-sensitive, and DeepSeek-V3 keeps them in bf16 too.
LINEAR_WEIGHT = re.compile(
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj)\.weight$"
)
# Routed experts stacked [E, out, in] (`models.moe.Experts`: parameters, not linear layers, so no
# `.weight`). The router (`mlp.gate.weight`) is neither pattern.
STACKED_EXPERTS = re.compile(r"(^|\.)mlp\.experts\.(gate_up_proj|down_proj)$")


def should_quantize(name: str, t: torch.Tensor) -> bool:
    """True for the 2-D weight of a linear layer (q/k/v/o, gate/up/down projections) and for the
    3-D stacked routed experts [E, out, in] (`mlp.experts.gate_up_proj` / `down_proj`)."""
    if not t.is_floating_point():
        return False
    if t.dim() == 2:
        return LINEAR_WEIGHT.search(name) is not None
    return t.dim() == 3 and STACKED_EXPERTS.search(name) is not None


def scale_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """Shape of the `scale_inv` of a [out, in] matrix, or of stacked experts [E, out, in]: one
    entry per (possibly partial) block, [ceil(out/128), ceil(in/128)] per matrix."""
    *lead, out_f, in_f = shape
    return (*lead, -(-out_f // BLOCK), -(-in_f // BLOCK))


def block_matrix_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int] | None:
    """[out, in] itself; stacked experts [E, out, in] as one [E*out, in] matrix when `out` is a
    multiple of 128, so that its 128x128 blocks are exactly the per-expert ones (its values and
    scales, row-major, are the stacked ones' bytes); else None (blocks would straddle experts)."""
    if len(shape) == 2:
        return (int(shape[0]), int(shape[1]))
    if len(shape) == 3 and shape[1] % BLOCK == 0:
        return (int(shape[0]) * int(shape[1]), int(shape[2]))
    return None


def as_block_matrix(t: torch.Tensor) -> torch.Tensor | None:
    """`t` as its `block_matrix_shape` (a view where it can be), or None."""
    shape = block_matrix_shape(t.shape)
    return t if t.dim() == 2 else None if shape is None else t.reshape(shape)


def _check_dims(t: torch.Tensor, what: str) -> None:
    if t.dim() not in (2, 3):
        raise ValueError(f"{what} expects [out, in] or stacked experts [E, out, in], got {tuple(t.shape)}")


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """[..., out, in] -> [..., out_blocks, BLOCK, in_blocks, BLOCK], zero-padding partial edge blocks."""
    *lead, out_f, in_f = w.shape
    *_, ob, ib = scale_shape(w.shape)
    pad_out, pad_in = ob * BLOCK - out_f, ib * BLOCK - in_f
    if pad_out or pad_in:
        w = F.pad(w, (0, pad_in, 0, pad_out))
    return w.view(*lead, ob, BLOCK, ib, BLOCK)


def _unblocks(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `_blocks`: [..., ob, BLOCK, ib, BLOCK] -> [..., out, in], the padding cut off."""
    *lead, ob, _, ib, _ = blocks.shape
    return blocks.view(*lead, ob * BLOCK, ib * BLOCK)[..., : shape[-2], : shape[-1]]


def _stack_fp8(qs: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack for float8 (through uint8: stacking float8 is not implemented everywhere)."""
    return torch.stack([q.view(torch.uint8) for q in qs]).view(FP8_DTYPE)


def quantize_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [out, in] matrix to (q: float8_e4m3fn [out, in], scale_inv: float32 [ob, ib]);
    stacked experts [E, out, in] expert by expert (scale_inv [E, ob, ib])."""
    _check_dims(w, "quantize_blockwise")
    from slipstream.kernels import fp8_block  # here: kernels.fp8_linear imports this module

    if fp8_block.available(w):
        return fp8_block.quantize(w)
    if w.dim() == 3 and fp8_block.available(w.flatten(0, 1)):  # stacked experts on the GPU
        flat = as_block_matrix(w)
        if flat is not None:
            q, scale_inv = fp8_block.quantize(flat)
            return q.view(w.shape), scale_inv.view(scale_shape(w.shape))
        pairs = [fp8_block.quantize(m) for m in w]
        return _stack_fp8([q for q, _ in pairs]), torch.stack([s for _, s in pairs])
    blocks = _blocks(w.float())
    amax = blocks.abs().amax(dim=(-3, -1))
    # An all-zero block would get scale 0 and divide 0 by 0; any positive scale reproduces zeros.
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = blocks / scale_inv[..., :, None, :, None]
    # amax / (amax / 448) can round a hair above 448, and e4m3fn has no infinity: what a cast
    # does past the largest finite value (saturate or NaN) differs between kernels, so clamp.
    q = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return _unblocks(q, w.shape).contiguous(), scale_inv


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: q * scale_inv, block by block, in `dtype`."""
    _check_dims(q, "dequantize_blockwise")
    if tuple(scale_inv.shape) != scale_shape(q.shape):
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not fit a {tuple(q.shape)} matrix "
            f"with {BLOCK}x{BLOCK} blocks (expected {scale_shape(q.shape)})"
        )
    from slipstream.kernels import fp8_block

    if fp8_block.available(q):
        return fp8_block.dequantize(q, scale_inv, dtype)
    if q.dim() == 3 and fp8_block.available(q.flatten(0, 1)):  # stacked experts on the GPU
        flat = as_block_matrix(q)
        if flat is not None:
            flat_scales = scale_inv.reshape(-1, scale_inv.shape[-1])
            return fp8_block.dequantize(flat, flat_scales, dtype).view(q.shape)
        return torch.stack([fp8_block.dequantize(m, s, dtype) for m, s in zip(q, scale_inv, strict=True)])
    blocks = _blocks(q.float())
    w = blocks * scale_inv.float()[..., :, None, :, None]
    return _unblocks(w, q.shape).to(dtype)


def fake_quantize_blockwise(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequantize_blockwise(*quantize_blockwise(w), dtype) (dtype defaults to w's): the weights
    unified FP8 training computes with, equal bit for bit to what the FP8 push delivers."""
    return dequantize_blockwise(*quantize_blockwise(w), dtype or w.dtype)


@torch.no_grad()
def round_fp8_weights_(model: torch.nn.Module) -> list[str]:
    """Replace every FP8 weight (`should_quantize`: the linear projections and the stacked routed
    experts) by its FP8 block rounding, in place: a rollout engine under unified FP8 serves version
    0 (the checkpoint) as the trainer computes it, as it serves every pushed version. Returns the
    rounded weights' names."""
    names = []
    for name, p in model.named_parameters():
        if should_quantize(name, p):
            p.copy_(fake_quantize_blockwise(p))
            names.append(name)
    return names
