"""Loading a weights version into the engine's layers; quantized weights as they travel, never
rounded twice.

A rollout server whose engine holds quantized layers stages a version keeping those tensors as
they came (`WeightStager(keep_int4=..., keep_fp8=...)`):

- int4 (--weight-sync-dtype int4): the packed uint8 [..., in/2] under the tensor's Hugging Face
  name and its fp32 group scales under `<name>_scale` (`quant/int4.py` has the layout). A W4A16
  layer (`kernels.w4a16.W4A16Linear`) takes those bytes as they are, so the engine computes with
  exactly the weights the trainer's --int4-qat forward used; a weight the engine holds as a plain
  parameter (stacked MoE experts: no grouped W4A16 kernel yet) gets the dequantized values.
- FP8 (--weight-sync-dtype fp8 into a --rollout-fp8 engine): the e4m3 values under the name and
  the 128x128 block scales under `<name>_scale_inv`; an `Fp8Linear` takes the blocks as they are
  (`load_blocks_`), the very blocks unified FP8 training computed with. Stacked MoE experts come
  dequantized to the engine's dtype even then (the stager keeps FP8 blocks of [out, in] matrices
  only: no FP8 grouped expert GEMM), and are copied in like any parameter.

A quantized layer given a full-precision weight (a bf16 version) quantizes it itself
(`take_full_precision`, which takes whatever the two above left). Each `take_*` checks every entry
it takes before returning the copies, so a bad update changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slipstream.quant import FP8_DTYPE, dequantize_int4, fake_quantize_int4, int4_names
from slipstream.weights.packer import INT4_SCALE_SUFFIX, SCALE_SUFFIX


@torch.no_grad()
def round_unconverted_(model: nn.Module, targets: str, layers: dict[str, nn.Module]) -> None:
    """The int4 weights no W4A16 layer holds (stacked experts) get their int4 rounding in place, so
    version 0 (the checkpoint) is served as the --int4-qat trainer computes it."""
    params = dict(model.named_parameters())
    for name in int4_names(((n, p.shape) for n, p in params.items()), targets) - layers.keys():
        params[name].copy_(fake_quantize_int4(params[name]))


def take_int4(
    state_dict: dict[str, torch.Tensor], layers: dict[str, nn.Module], params: dict[str, torch.Tensor]
) -> list[Callable[[], None]]:
    """Remove from `state_dict` the entries that are int4 (packed weight and its scales) or that
    address a W4A16 layer, check their shapes (ValueError names a wrong one), and return the
    copies to run once the whole update has been checked."""
    packed = [
        n for n, t in state_dict.items() if t.dtype == torch.uint8 and n + INT4_SCALE_SUFFIX in state_dict
    ]
    names = set(packed) | (state_dict.keys() & layers.keys())
    copies: list[Callable[[], None]] = []
    for name in sorted(names):
        tensor = state_dict.pop(name)
        scales = state_dict.pop(name + INT4_SCALE_SUFFIX) if name in packed else None
        layer, param = layers.get(name), params.get(name)
        if layer is None and param is None:
            raise ValueError(f"load_weights: unknown parameter {name!r}")
        want = (layer.out_features, layer.in_features) if layer is not None else tuple(param.shape)
        got = tuple(tensor.shape) if scales is None else (*tensor.shape[:-1], tensor.shape[-1] * 2)
        if got != want:
            raise ValueError(f"load_weights: {name} has shape {got}, expected {want}")
        copies.append(_copy(layer, param, tensor, scales))
    return copies


def _copy(layer, param, tensor: torch.Tensor, scales: torch.Tensor | None) -> Callable[[], None]:
    if layer is not None and scales is not None:
        return lambda: layer.load_packed_(tensor.to(layer.packed.device), scales.to(layer.packed.device))
    if layer is not None:
        return lambda: layer.load_(tensor)
    if scales is not None:
        return lambda: param.copy_(
            dequantize_int4(tensor.to(param.device), scales.to(param.device), param.dtype)
        )
    raise AssertionError("take_int4 takes only int4 entries and W4A16 layers' weights")


def take_fp8_blocks(
    state_dict: dict[str, torch.Tensor], layers: dict[str, nn.Module]
) -> list[Callable[[], None]]:
    """Remove from `state_dict` the FP8 weights (e4m3 values and their `<name>_scale_inv` block
    scales) of the engine's `Fp8Linear` layers, check them, and return the copies to run."""
    names = [n for n, t in state_dict.items() if t.dtype == FP8_DTYPE and n + SCALE_SUFFIX in state_dict]
    copies: list[Callable[[], None]] = []
    for name in names:
        layer = layers.get(name)
        if layer is None:
            raise ValueError(
                f"load_weights: {name} came as FP8 blocks, this engine holds no FP8 layer for it"
            )
        q, scale_inv = state_dict.pop(name), state_dict.pop(name + SCALE_SUFFIX)
        if tuple(q.shape) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"load_weights: {name} has shape {tuple(q.shape)}, expected {(layer.out_features, layer.in_features)}"
            )
        copies.append(
            lambda layer=layer, q=q, s=scale_inv: layer.load_blocks_(
                q.to(layer.weight.device), s.to(layer.weight.device)
            )
        )
    return copies


def take_full_precision(
    state_dict: dict[str, torch.Tensor], fp8_layers: dict[str, nn.Module], params: dict[str, torch.Tensor],
    tied: bool,
) -> list[Callable[[], None]]:  # fmt: skip
    """Take every remaining entry, full-precision weights: check its name and shape (ValueError names
    a wrong one) and return the copies, cast to each parameter's dtype; an `Fp8Linear` given one
    quantizes it itself. A tied `lm_head.weight` is skipped: the embedding it shares comes too."""
    copies: list[Callable[[], None]] = []
    for name, tensor in state_dict.items():
        if tied and name == "lm_head.weight":
            continue
        layer = fp8_layers.get(name)
        param = params.get(name)
        if layer is None and param is None:
            raise ValueError(f"load_weights: unknown parameter {name!r}")
        want = (layer.out_features, layer.in_features) if layer is not None else tuple(param.shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"load_weights: {name} has shape {tuple(tensor.shape)}, expected {want}")
        if layer is not None:  # re-quantized row-wise into the layer's own buffers
            copies.append(lambda layer=layer, t=tensor: layer.load_(t))
        else:
            copies.append(lambda p=param, t=tensor: p.copy_(t.to(device=p.device, dtype=p.dtype)))
    state_dict.clear()
    return copies
