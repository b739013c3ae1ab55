"""The sparse mixture-of-experts block (Qwen3-MoE), and the routing side channel R3 needs.

What the block computes, as `transformers`' `Qwen3MoeSparseMoeBlock` does: router logits
`x @ gate^T`; a softmax over the experts in fp32; the top-k probabilities and their expert ids;
optionally renormalised over the k (`norm_topk_prob`); times `routed_scaling_factor` (DeepSeek-V3's
key; 1 in Qwen3-MoE, which has none); cast back to x's dtype; then the output is the weighted sum of
the k chosen experts, each a SwiGLU MLP. No shared experts (Qwen3-MoE has none).

Why the factor matters in training: renormalised gates sum to one, so the layer is a convex
combination of its k experts, and AdamW, whose per-weight step is ~lr whatever the gradient's
scale, moves the layer's output ~k times less per step than a dense MLP of the same active width
(tests/test_moe_dense_equivalence.py shows it exactly). `routed_scaling_factor = k` makes a layer
with equal gates the dense MLP of width k * moe_intermediate_size, gradients and steps included.

The experts are stored stacked, as transformers 5 holds them: `gate_up_proj` [E, 2I, H] (gate rows
first) and `down_proj` [E, H, I], one tensor per projection, the layout a grouped GEMM takes.
Published checkpoints name each expert's projections separately; `hf.py` converts both ways. The
eager loop over the experts that tokens were routed to is the reference arithmetic (CPU, tests);
a fused kernel would wrap it, not change it.

`Routing` is a side channel through one forward, by MoE layer in layer order:
- replay (rollout routing replay, R3): the caller gives the expert ids each token must use; the
  gate weights are recomputed from this forward's router probabilities at those ids (then
  renormalised as usual), so gradients still reach the router. A token whose row is -1 (no
  record) routes itself;
- capture: the ids each token was routed to (what the rollout engine records per token), under
  replay also the router's own top-k (`chosen`: how often it agrees with the replayed ids), and
  the router logits when asked (what `load_balancing_loss` takes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.models.config import ModelConfig


class Routing:
    """One forward's routing side channel; MoE layers are numbered 0.. in layer order.

    A plain class, not a dataclass: the trainer's FSDP2 units rebuild every dataclass among their
    inputs that holds a tensor requiring grad (to hook its backward), so once the first layer had
    put its router logits in, the later layers would fill a copy (tests/test_fsdp_moe.py)."""

    def __init__(self, replay: Sequence[torch.Tensor] | None = None, keep_router_logits: bool = False):
        self.replay = replay  # per MoE layer: ids to use, [..., top_k] like the tokens
        self.keep_router_logits = keep_router_logits  # also keep each layer's router logits (aux loss)
        self.experts: list[torch.Tensor] = []  # filled: per MoE layer, ids used [..., top_k]
        self.chosen: list[torch.Tensor] = []  # filled under replay: the router's own top-k
        self.router_logits: list[torch.Tensor] = []  # filled if kept: [tokens, E]

    def stacked(self) -> torch.Tensor:
        """The captured ids as one tensor [..., num_moe_layers, top_k]."""
        return torch.stack(self.experts, dim=-2)


def route(
    logits: torch.Tensor,
    top_k: int,
    renormalise: bool,
    replay: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (gate weights [N, k] in the logits' dtype, times `scale`, expert ids
    [N, k], the router's own top-k ids [N, k]).

    With `replay` (ids [..., k] flattening to [N, k]), a row's ids are the given ones unless they
    are -1, and the weights are the softmax over all experts gathered at the ids used."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, chosen = torch.topk(probs, top_k, dim=-1)
    ids = chosen
    if replay is not None:
        given = replay.reshape(-1, top_k).to(device=logits.device, dtype=torch.int64)
        ids = torch.where(given[:, :1] >= 0, given, chosen)
        weights = probs.gather(-1, ids)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weights = weights * scale
    return weights.to(logits.dtype), ids, chosen


class Experts(nn.Module):
    """E SwiGLU MLPs, stacked: `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]."""

    linear = staticmethod(F.linear)  # each expert's GEMM (kernels/invariant.py swaps in its own)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], ids and weights [N, k] -> sum over k of weight * expert(x), [N, H].

        The token-slots are grouped by expert (one gather), each expert runs on its contiguous
        rows, and `combine` sums them back."""
        top_k = ids.shape[-1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # token-slots grouped by expert, ascending
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        ys = []
        for expert, rows in enumerate(x[order // top_k].split(counts)):
            if rows.shape[0]:
                gate, up = self.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
                ys.append(self.linear(F.silu(gate) * up, self.down_proj[expert]))
        return self.combine(x, ids, order, torch.cat(ys) * weights.reshape(-1)[order, None])

    def combine(
        self, x: torch.Tensor, ids: torch.Tensor, order: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Each token's sum of its k weighted expert outputs, [N, H]; y's rows are the token-slots in
        `order`. One index_add_: per token in ascending expert id, as transformers' loop over the
        experts adds them (bit for bit on the CPU)."""
        return torch.zeros_like(x).index_add_(0, order // ids.shape[-1], y)


class SparseMoE(nn.Module):
    """Router (`gate`, a bias-free linear H -> E) and experts; `moe_index` numbers it among MoE layers."""

    def __init__(self, config: ModelConfig, moe_index: int) -> None:
        super().__init__()
        self.moe_index = moe_index
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        lead, hidden = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, hidden)
        logits = self.gate(flat)
        replay = None if routing is None or routing.replay is None else routing.replay[self.moe_index]
        weights, ids, chosen = route(
            logits, self.top_k, self.norm_topk_prob, replay, self.routed_scaling_factor
        )
        if routing is not None:
            routing.experts.append(ids.view(*lead, self.top_k))
            if replay is not None:
                routing.chosen.append(chosen.view(*lead, self.top_k))
            if routing.keep_router_logits:
                routing.router_logits.append(logits)
        return self.experts(flat, ids, weights).view(*lead, hidden)


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over the MoE layers, as transformers'
    `load_balancing_loss_func`: num_experts * sum_e (share of top-k assignments to e) * (mean
    router probability of e), pooled over layers and tokens; `mask` [tokens] (1 = real token)
    leaves padding out. The trainer adds it weighted by --moe-aux-loss-coeff (services/trainer/routing.py)."""
    device = router_logits[0].device
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    weight = (
        torch.ones(router_logits[0].shape[0], device=device) if mask is None else mask.reshape(-1).float()
    )
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        _, ids = torch.topk(probs, top_k, dim=-1)
        assigned = assigned.scatter_add(0, ids.reshape(-1), weight.repeat_interleave(top_k))
        probs_sum = probs_sum + (probs * weight[:, None]).sum(dim=0)
    rows = weight.sum() * len(router_logits)
    return num_experts * torch.sum((assigned / rows) * (probs_sum / rows))


def expert_load(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, per MoE layer: ids [..., layers, top_k] -> counts [layers, E]."""
    per_layer = experts.reshape(-1, *experts.shape[-2:]).transpose(0, 1).reshape(experts.shape[-2], -1)
    counts = torch.zeros(per_layer.shape[0], num_experts, dtype=torch.int64, device=experts.device)
    return counts.scatter_add_(1, per_layer.long(), torch.ones_like(per_layer, dtype=torch.int64))
