"""`--bf16`: bf16 compute weights, fp32 master weights in the optimizer.

The split Megatron's Float16OptimizerWithFloat16Params and FSDP2's
`MixedPrecisionPolicy(param_dtype=bf16)` make. The model the rest of the trainer knows
(`Actor.model`: checkpoints save and load it, the weight push reads it, AdamW steps it) keeps
float32 parameters, because a 1e-6 AdamW step is below bf16's resolution for most weights.
Forward and backward run on a bf16 copy of it (`compute`): bf16 end to end, a bf16 residual
stream (RMSNorm still normalises in fp32 inside), and no cast of any weight at any use.

Autocast, which this replaces, cast every fp32 weight to bf16 at every use (the proximal
forward, the forward and the backward of each micro-batch) and kept the residual stream in
fp32 around every bf16 GEMM: on the H200 those casts were 37% of a step's kernel time.

The bookkeeping, per optimizer step:
- each bf16 parameter's gradient, once autograd has accumulated it for a backward, is added
  into its master's fp32 `.grad` and freed (`register_post_accumulate_grad_hook`), so
  accumulation over micro-batches happens in fp32 as before (within one backward, the uses of
  a weight, e.g. the LM head's token chunks, are summed in bf16 by autograd);
- clipping and AdamW (fused on CUDA) run on the masters, exactly as without this split;
- `refresh()` rounds the masters into the bf16 weights once, after the step. A skipped
  (non-finite) step never reaches it, so masters, moments and bf16 weights stay as they were.
  `refresh_if_changed()` catches anything else that wrote the masters (a checkpoint load) by
  their version counters, before the next forward.

Single process only: under FSDP2 the same split is FSDP2's own `MixedPrecisionPolicy`
(`parallel.shard_model`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class MasterWeights:
    def __init__(self, master: nn.Module, dtype: torch.dtype = torch.bfloat16):
        """The compute copy starts beside the masters; --optimizer-cpu-offload then moves it to the
        device (`compute.to(device)`), leaving masters, gradients and AdamW moments on the CPU."""
        self.master = master
        self.compute = copy.deepcopy(master).to(dtype)  # deepcopy keeps tied weights tied
        names = [n for n, _ in master.named_parameters()]
        if names != [n for n, _ in self.compute.named_parameters()]:
            raise RuntimeError("the bf16 compute copy does not have the master's parameters")
        self.pairs = list(zip(master.parameters(), self.compute.parameters(), strict=True))
        for m, c in self.pairs:
            if c.requires_grad:
                c.register_post_accumulate_grad_hook(_accumulate_into(m))
        self._versions: list[int] = []
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """bf16 weights := the masters, rounded (one fused copy over all of them)."""
        computes, masters = [c for _, c in self.pairs], [m for m, _ in self.pairs]
        if masters and masters[0].device != computes[0].device:  # offloaded masters
            for c, m in zip(computes, masters, strict=True):
                c.copy_(m, non_blocking=True)
        else:
            torch._foreach_copy_(computes, masters)
        self._versions = [m._version for m, _ in self.pairs]

    def refresh_if_changed(self) -> None:
        if [m._version for m, _ in self.pairs] != self._versions:
            self.refresh()


def _accumulate_into(master: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        grad = param.grad
        if master.grad is None:
            master.grad = grad.to(device=master.device, dtype=torch.float32)
        else:
            master.grad.add_(grad.to(master.device))
        param.grad = None  # the bf16 gradient is only ever a staging buffer

    return hook
