"""Mixture-of-experts routing in the trainer: replay (R3, R2), the load-balancing loss, metrics.

Which experts a forward of the policy uses (`models/moe.py`'s `Routing` carries them in):
- `--use-rollout-routing-replay` (R3): the experts the rollout engine routed each input position
  to (`Batch.routed_experts`: the sample's record, prompt positions included), in every forward of
  the policy, proximal and training alike. A position without a record (-1) routes itself.
- `--use-routing-replay` (R2): a micro-batch's first forward of the step routes itself and is
  kept; its later forwards (the training pass after the proximal pass) replay it.
- otherwise each forward routes itself.
The gate weights are always this forward's router probabilities at the ids used (softmax over
all experts, gathered, renormalised as `norm_topk_prob` says), so the router keeps its gradient.
The reference model routes itself.

What the training forward measures (token-layer means over the step, rows with a record only):
`moe_routing_agreement`, the share of (position, MoE layer) whose experts used equal, as a set,
the rollout's (1.0 under R3 unless records are missing); `moe_router_agreement`, the share whose
trainer-router top-k equals the rollout's (equal to the first without replay; under R3 what the
trainer would have chosen); `moe_aux_loss`, the Switch load-balancing loss of the trained
positions, added to the loss times `--moe-aux-loss-coeff` (default the checkpoint's
`router_aux_loss_coef`) and the micro-batch's share of its optimizer step; `moe_expert_load_max`,
the busiest expert's tokens over the mean per expert (1.0 = perfectly balanced; max over layers and
micro-batches). Under R3 also, on the step's first PROBE_SAMPLES samples before the weights move,
the train/rollout mean |log-prob difference| with the replay and without it
(`moe_logprob_abs_diff_replay`, `moe_logprob_abs_diff_no_replay`): the gap replay closes.
"""

from __future__ import annotations

import logging

import torch

from slipstream.config import TrainConfig
from slipstream.models.config import ModelConfig
from slipstream.models.moe import Routing, expert_load, load_balancing_loss

from .batch import Batch
from .step_metrics import StepMeans

PROBE_SAMPLES = 4
log = logging.getLogger("slipstream.trainer")


class MoERouting:
    """One trainer's routing policy; `start_step` forgets the previous step's kept routing (R2)."""

    def __init__(self, model: ModelConfig, train: TrainConfig) -> None:
        self.num_layers, self.top_k, self.num_experts = (
            len(model.moe_layers), model.num_experts_per_tok, model.num_experts,
        )  # fmt: skip
        self.rollout_replay = train.use_rollout_routing_replay
        self.own_replay = train.use_routing_replay
        coef = train.moe_aux_loss_coeff
        if not self.num_layers:
            for flag, on in (
                ("--use-rollout-routing-replay", self.rollout_replay),
                ("--use-routing-replay", self.own_replay),
                ("--moe-aux-loss-coeff", bool(coef)),
            ):
                if on:
                    raise ValueError(f"{flag} needs a mixture-of-experts model; {model.model_type} is dense")
        self.aux_coef = model.router_aux_loss_coef if coef is None else coef
        self._kept: dict[int, torch.Tensor] = {}
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.num_layers > 0

    def start_step(self) -> None:
        self._kept.clear()

    def _frame(self, batch: Batch) -> torch.Tensor | None:
        """The rollout's records in the model input's frame, [..., layers, k], or None."""
        rows = batch.routed_experts if batch.packed is None else batch.packed.routed_experts
        if rows is None:
            return None
        if rows.shape[-1] != self.num_layers * self.top_k:
            raise ValueError(
                f"samples carry routed experts of {rows.shape[-1]} per position; this model routes "
                f"{self.num_layers} MoE layers x top-{self.top_k} = {self.num_layers * self.top_k}"
            )
        frame = rows.view(*rows.shape[:-1], self.num_layers, self.top_k)
        return frame if batch.packed is None else frame[None]

    def routing(self, batch: Batch, *, training: bool) -> Routing | None:
        """The `Routing` for one forward of the policy on `batch` (None for a dense model)."""
        if not self.enabled:
            return None
        replay = self._frame(batch) if self.rollout_replay else self._kept.get(id(batch))
        if self.rollout_replay and replay is None and not self._warned:
            self._warned = True
            log.warning(
                "--use-rollout-routing-replay: these samples carry no routed experts "
                "(Sample.rollout_routed_experts); their tokens route themselves"
            )
        layers = None if replay is None else [replay[..., i, :] for i in range(self.num_layers)]
        return Routing(replay=layers, keep_router_logits=training and self.aux_coef > 0)

    def forward_done(self, batch: Batch, routing: Routing | None) -> None:
        """R2: keep what a micro-batch's first forward of the step chose."""
        if routing is not None and self.own_replay and id(batch) not in self._kept:
            self._kept[id(batch)] = torch.stack(routing.experts[: self.num_layers], dim=-2).detach()

    def training_terms(
        self, batch: Batch, routing: Routing | None, weights: torch.Tensor, means: StepMeans
    ) -> torch.Tensor | float:
        """After a training forward: its metrics into `means`; the aux loss term to add (or 0)."""
        if routing is None:
            return 0.0
        self.forward_done(batch, routing)
        used = torch.stack(routing.experts[: self.num_layers], dim=-2)  # [..., layers, k]
        real = self._real_positions(batch)
        recorded = self._frame(batch)
        if recorded is not None:
            has = (recorded[..., 0] >= 0) & real[..., None]  # [..., layers]
            n = has.sum()
            chosen = torch.stack(routing.chosen[: self.num_layers], dim=-2) if routing.chosen else used
            for name, ids in (("moe_routing_agreement", used), ("moe_router_agreement", chosen)):
                same = (ids.sort(-1).values == recorded.long().sort(-1).values).all(-1)
                means.add_sum(name, (same & has).sum(), n)
        counts = expert_load(used[real], self.num_experts).float()  # [layers, E]
        busiest = counts.max(-1).values / counts.mean(-1).clamp(min=1e-9)
        means.max("moe_expert_load_max", busiest.max())
        if not routing.router_logits:
            return 0.0
        logits = routing.router_logits[: self.num_layers]
        aux = load_balancing_loss(logits, self.num_experts, self.top_k, mask=real.reshape(-1))
        means.add("moe_aux_loss", aux.detach(), batch.num_tokens)
        return self.aux_coef * aux * weights.sum()

    @torch.no_grad()
    def replay_gap(self, log_probs, probe: Batch, means: StepMeans) -> None:
        """R3's effect on `probe`: `log_probs(batch, routing=)` with the rollout's experts, then routed
        by the trainer itself; each one's mean |difference| from the rollout's log-probs."""
        trained = probe.loss_mask > 0
        for name, routing in (
            ("moe_logprob_abs_diff_replay", self.routing(probe, training=False)),
            ("moe_logprob_abs_diff_no_replay", Routing()),
        ):
            gap = (log_probs(probe, routing=routing) - probe.rollout_log_probs).abs() * trained
            means.add_sum(name, gap.sum(), trained.sum())

    @staticmethod
    def _real_positions(batch: Batch) -> torch.Tensor:
        """[B, T] (padded) or [1, N] (packed) bool: positions holding a sample's token, not padding."""
        if batch.packed is not None:
            return torch.ones_like(batch.packed.input_ids, dtype=torch.bool)
        cols = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
        return cols[None, :] < batch.seq_lens[:, None]
