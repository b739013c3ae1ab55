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

`use_grouped_experts(model, kernel)` switches a model's MoE layers to this path. The trainer takes
`torch._grouped_mm` (its backward is CUTLASS's too); so does the rollout engine where it runs
(Hopper, bf16), and elsewhere on CUDA the Triton grouped GEMM of the bitwise mode
(`kernel="triton"`: `invariant_gpu.grouped_matmul`, the same device-side tile table, any GPU and
dtype, forward only). Either lets the CUDA-graph decode take MoE models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.kernels import invariant_gpu


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs this device/dtype without a host sync (Hopper bf16; any CPU)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    return (
        device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    )


# The Triton grouped GEMM's tiling in the engine (`kernel="triton"`): rows of one expert, columns and
# inputs a program, warps. On the H200 at the Qwen3-30B-A3B shape the mode's 64/64/64 is within 1-3%
# of the best of 12 tilings at 64 and 256 rows (bench/moe_gpu.py --expert-sweep, session 16).
TRITON_BLOCKS = invariant_gpu.Blocks(m=64, n=64, k=64, warps=4)


def grouped_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    kernel: str = "grouped_mm",
) -> torch.Tensor:  # fmt: skip
    """x [N, H], ids [N, k] (int64), weights [N, k], gate_up [E, 2I, H], down [E, H, I] -> [N, H].
    kernel "grouped_mm": `torch._grouped_mm` (autograd: the trainer's); "triton": the bitwise mode's
    grouped GEMM (`invariant_gpu.grouped_matmul`, forward only, CUDA: the engine's)."""
    n, top_k = ids.shape
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    rows = x[order // top_k]
    if kernel == "triton":
        tiles = invariant_gpu.expert_tiles(counts, rows.shape[0], TRITON_BLOCKS.m)
        h = invariant_gpu.grouped_matmul(rows, gate_up, tiles, TRITON_BLOCKS)
        gate, up = h.chunk(2, dim=-1)
        y = invariant_gpu.grouped_matmul(F.silu(gate) * up, down, tiles, TRITON_BLOCKS)
    else:
        offs = counts.cumsum(0, dtype=torch.int32)
        h = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)
    slots = torch.empty_like(y).index_copy_(0, order, y).view(n, top_k, -1)
    return (slots.float() * weights[..., None].float()).sum(1).to(x.dtype)


def use_grouped_experts(model: nn.Module, kernel: str = "grouped_mm") -> int:
    """Run every `Experts` of `model` through `grouped_experts` with `kernel`; the number of layers
    switched (0 when the model has none or the kernel is not available for its weights)."""
    from slipstream.models.moe import Experts

    switched = 0
    for module in model.modules():
        if not isinstance(module, Experts):
            continue
        weight = module.gate_up_proj
        runs = (
            invariant_gpu.available(weight) if kernel == "triton" else available(weight.device, weight.dtype)
        )
        if not runs:
            continue

        def forward(x, ids, weights, _m=module):
            return grouped_experts(x, ids, weights, _m.gate_up_proj, _m.down_proj, kernel)

        module.forward = forward
        switched += 1
    return switched
