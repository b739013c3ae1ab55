"""Mixture-of-experts experts as two grouped GEMMs, with no host sync (CUDA-graph capturable).

`models/moe.py`'s `Experts` is the reference: a Python loop over the experts that tokens were
routed to, which reads the per-expert counts on the host (`.tolist()`) and so can be neither
captured in a CUDA graph nor fast at decode (128 experts = hundreds of small launches a layer).
Here the same function runs as:

    order   = argsort(expert id of every token-slot)       # slots grouped by expert
    offs    = cumsum(slots per expert)                       # on the device: group ends
    h       = grouped_mm(x[order // k], gate_up^T, offs)     # [N*k, 2I], one launch for all experts
    y       = grouped_mm(silu(gate) * up, down^T, offs)      # [N*k, H]
    out     = sum over k of weight * y (slots put back in token order, summed in fp32)

`torch._grouped_mm` is CUTLASS's grouped GEMM on Hopper (bf16), and a loop elsewhere; shapes are
static for a given batch (N*k rows whatever the routing), which is what a CUDA graph needs. The
router (softmax, top-k, renormalisation) stays `moe.route`, so R3 replay and routing capture are
unchanged. The per-token sum of the k experts is deterministic (a reduction over k, not atomics),
in fp32 rounded once, where the reference adds expert by expert in the activation dtype: equal up
to rounding, not bit for bit.

`use_grouped_experts(model)` switches a model's MoE layers to this path (the rollout engine does
on CUDA, which lets its CUDA-graph decode take MoE models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs this device/dtype without a host sync (Hopper bf16; any CPU)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    return (
        device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    )


def grouped_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """x [N, H], ids [N, k] (int64), weights [N, k], gate_up [E, 2I, H], down [E, H, I] -> [N, H]."""
    n, top_k = ids.shape
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    h = torch._grouped_mm(x[order // top_k], gate_up.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)
    slots = torch.empty_like(y).index_copy_(0, order, y).view(n, top_k, -1)
    return (slots.float() * weights[..., None].float()).sum(1).to(x.dtype)


def use_grouped_experts(model: nn.Module) -> int:
    """Run every `Experts` of `model` through `grouped_experts`; the number of layers switched (0 when
    the model has none or the kernel is not available for its weights)."""
    from slipstream.models.moe import Experts

    switched = 0
    for module in model.modules():
        if isinstance(module, Experts) and available(module.gate_up_proj.device, module.gate_up_proj.dtype):

            def forward(x, ids, weights, _m=module):
                return grouped_experts(x, ids, weights, _m.gate_up_proj, _m.down_proj)

            module.forward = forward
            switched += 1
    return switched
