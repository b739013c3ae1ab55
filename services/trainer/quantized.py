"""Quantization-aware training: the trainer computes with the weights the rollout serves.

`--fp8-format e4m3 --fp8-recipe blockwise` (unified FP8) and `--int4-qat` make the trainer's
forward and backward run on the quantized weights the weight push delivers, so the rollout's
log-probs and the trainer's are of the same numbers (FP8 sampling with full-precision training is
the train/rollout gap that collapses RL on MoE models; a rollout serving int4 with a trainer that
never saw the rounding is a wider one). Which weights: unified FP8 rounds what the FP8 wire
quantizes (`quant.should_quantize`: the q/k/v/o and gate/up/down projections, and on an MoE the
stacked routed experts [E, out, in], each expert its own 128x128 blocks), --int4-qat the
`quant.int4_names` set of --int4-qat-targets (every linear projection of a dense model, the routed
experts of an MoE one). Embeddings, LM head, norms and routers stay full precision in both.
`--true-on-policy-mode` rounds every weight to the bf16 it is pushed as (`kernels.invariant.served`;
the engine rounds its version 0 the same way), so both sides compute with identical weights.

How. The masters (what AdamW steps, checkpoints save and the push reads) stay full precision (fp32
unless --dtype says otherwise). Forward and backward run on a compute copy (`precision.py`'s split,
bf16 under --bf16, else the masters' dtype) whose quantized weights are refreshed once per optimizer
step as `dequantize(quantize(master))` in fp32, cast to the compute dtype: exactly what the
rollout's stager computes from the pushed bytes (`dequantize_blockwise(q, scale_inv, dtype)`,
`dequantize_int4(packed, scales, dtype)`), since the push quantizes the same masters with the same
function. The gradient with respect to a quantized weight is accumulated into its master unchanged:
the straight-through estimator. A checkpoint holds the masters, so reloading one re-derives the
quantized weights bit for bit (`refresh_if_changed`).

Activations. A `--rollout-fp8` engine also rounds each projection's input to e4m3, one scale per
token (`kernels.fp8_linear.quantize_rows`, before its FP8 GEMM). Under unified FP8 with
`--rollout-fp8` the trainer does the same to the same projections' inputs in its forward (a
pre-hook; straight-through in backward), so the two compute the same function; without
`--rollout-fp8` the engine keeps its activations as they are, and so does the trainer. Routed
experts are FP8-rounded weights either way but never FP8 GEMMs (the engine has no FP8 grouped
expert GEMM: it dequantizes them and computes in its own dtype), so their inputs are not rounded.

Cost: one extra compute copy of the weights (the fp32 trainer has none otherwise) and one
quantize/dequantize of the targets per optimizer step, not per micro-batch.

Under torchrun (FSDP2). There is no compute copy: each rank holds rows of the masters (FSDP2
shards along dim 0) and a quantization block needs whole 128x128 tiles (FP8) or whole groups of
128 inputs (int4), which a row shard cuts through. So the quantizer runs where FSDP2 has gathered
the whole master for a forward: every module owning a quantized weight is an FSDP2 unit of its own
(`parallel.shard_model(full_precision=...)`), gathered in the masters' own dtype, not in --bf16's
(the push quantizes the fp32 masters; quantizing their bf16 roundings would serve other numbers),
and `quantize_in_forward` swaps its weight for `q(gathered master, compute dtype)` for the
duration of the module's forward (hooks; the gathered master is put back before FSDP2 reshards).
Backward passes the gradient straight through to the gathered master (`_StraightThrough`), which
FSDP2 reduce-scatters into the sharded master's as any gradient. The numbers are those of one
process (the same function of the same masters, in the same compute dtype); the cost differs: the
quantizer runs per forward (each micro-batch, its recomputation under --gradient-checkpointing)
instead of once per optimizer step, and the quantized projections are gathered in fp32 (twice
bf16's bytes) as separate units (more, smaller collectives).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slipstream.config import TrainConfig
from slipstream.kernels import invariant
from slipstream.kernels.fp8_linear import quantize_rows
from slipstream.quant import fake_quantize_blockwise, fake_quantize_int4, int4_names, should_quantize

from .precision import MasterWeights

# (master weight, compute dtype) -> the weight the forward computes with
Quantizer = Callable[[torch.Tensor, torch.dtype], torch.Tensor]

_RECIPES: dict[str, Quantizer] = {"blockwise": fake_quantize_blockwise}


def quantizers(train: TrainConfig, model: nn.Module) -> dict[str, Quantizer]:
    """Parameter name -> its quantizer, for the weights --int4-qat / --fp8-format round ({}: off)."""
    params = dict(model.named_parameters())
    if train.true_on_policy_mode:  # every weight, as the bf16 the rollout computes with
        return dict.fromkeys(params, invariant.served)
    if train.int4_qat:
        names = int4_names(((n, p.shape) for n, p in params.items()), train.int4_qat_targets)
        return dict.fromkeys(sorted(names), fake_quantize_int4)
    if train.fp8_format:
        fn = _RECIPES[train.fp8_recipe]
        return {n: fn for n, p in params.items() if should_quantize(n, p)}
    return {}


def compute_weights(
    model: nn.Module, train: TrainConfig, distributed: bool, rollout_fp8: bool = False
) -> MasterWeights | None:
    """The compute copy forward and backward run on, or None (they run on `model` itself):
    a `QuantizedWeights` under --int4-qat / --fp8-format (with `rollout_fp8`, --rollout-fp8, the
    FP8 projections' inputs rounded per token as that engine rounds them), a bf16 `MasterWeights`
    under --bf16 in one process (FSDP2 makes its own), else None. Under FSDP2 (`distributed`)
    the quantized weights are made in `model`'s own forward (`quantize_in_forward`)."""
    quant = quantizers(train, model)
    compute_dtype = torch.bfloat16 if train.bf16 else next(model.parameters()).dtype
    if quant and distributed:  # the sharded model quantizes what FSDP2 gathers for its forward
        if train.true_on_policy_mode:
            raise ValueError("--true-on-policy-mode runs in one trainer process (not under torchrun)")
        quantize_in_forward(model, quant, compute_dtype)
        if train.fp8_format and rollout_fp8:
            round_inputs_per_token(model, sorted(quant))
        return None
    if quant:
        weights = QuantizedWeights(model, compute_dtype, quant)
        if train.fp8_format and rollout_fp8:
            round_inputs_per_token(weights.compute, weights.quantized_names)
        return weights
    if train.bf16 and not distributed:
        return MasterWeights(model)
    return None


def quantized_modules(quant: dict[str, Quantizer]) -> list[str]:
    """The modules owning the weights `quant` rounds: under FSDP2 each one an FSDP2 unit of its own,
    gathered in the masters' dtype (`parallel.shard_model(full_precision=...)`)."""
    return sorted({name.rsplit(".", 1)[0] for name in quant})


def quantize_in_forward(model: nn.Module, quant: dict[str, Quantizer], dtype: torch.dtype) -> None:
    """Each module owning a weight in `quant` computes with `quant[name](weight, dtype)` instead of
    the weight itself, gradients straight through: the weight as its forward finds it (under FSDP2
    the gathered, unsharded master) is swapped out for the forward and put back after it."""
    owned: dict[str, dict[str, Quantizer]] = {}
    for name, fn in quant.items():
        owner, leaf = name.rsplit(".", 1)
        owned.setdefault(owner, {})[leaf] = fn
    for owner, leaves in owned.items():
        held: dict[str, torch.Tensor] = {}

        def swap_in(module, _args, _leaves=leaves, _held=held):
            for leaf, fn in _leaves.items():
                _held[leaf] = module._parameters[leaf]
                module._parameters[leaf] = _StraightThrough.apply(_held[leaf], fn, dtype)

        def swap_back(module, _args, _out, _held=held):
            module._parameters.update(_held)
            _held.clear()

        module = model.get_submodule(owner)
        module.register_forward_pre_hook(swap_in)  # after FSDP2's own, which gathers the weight
        module.register_forward_hook(swap_back, prepend=True, always_call=True)  # before it reshards


class _StraightThrough(torch.autograd.Function):
    """forward: `quantizer(master, dtype)`; backward: the gradient unchanged, in the master's dtype."""

    @staticmethod
    def forward(ctx, master: torch.Tensor, quantizer: Quantizer, dtype: torch.dtype) -> torch.Tensor:
        ctx.master_dtype = master.dtype
        return quantizer(master.detach(), dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.master_dtype), None, None


class QuantizedWeights(MasterWeights):
    """`MasterWeights` whose refresh writes the quantized weights into the compute copy."""

    def __init__(self, master: nn.Module, dtype: torch.dtype, quant: dict[str, Quantizer]):
        names = [n for n, _ in master.named_parameters()]
        missing = sorted(quant.keys() - set(names))
        if missing:
            raise ValueError(f"quantized weights name no parameter: {missing[:3]}")
        self._quant = [quant.get(n) for n in names]  # aligned with `pairs`
        super().__init__(master, dtype)

    @torch.no_grad()
    def refresh(self) -> None:
        plain = [(m, c) for (m, c), q in zip(self.pairs, self._quant, strict=True) if q is None]
        if plain:
            torch._foreach_copy_([c for _, c in plain], [m for m, _ in plain])
        for (m, c), q in zip(self.pairs, self._quant, strict=True):
            if q is not None:
                c.copy_(q(m.detach(), c.dtype))
        self._versions = [m._version for m, _ in self.pairs]

    @property
    def quantized_names(self) -> list[str]:
        """The parameters computed with quantized weights, in model order."""
        names = [n for n, _ in self.master.named_parameters()]
        return [n for n, q in zip(names, self._quant, strict=True) if q is not None]


def round_inputs_per_token(model: nn.Module, weight_names: list[str]) -> None:
    """The linear layers owning `weight_names` see their input rounded to e4m3 with one scale per
    token, as a --rollout-fp8 engine's FP8 GEMM does; the gradient passes straight through. Other
    owners (stacked experts, which that engine computes unrounded in its dtype) are left alone."""
    for name in weight_names:
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, nn.Linear):
            owner.register_forward_pre_hook(_round_rows)


def _round_rows(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    q, scale = quantize_rows(x.detach().reshape(-1, x.shape[-1]))
    rounded = (q.float() * scale).to(x.dtype).view_as(x)
    return (x + (rounded - x).detach(), *args[1:])
