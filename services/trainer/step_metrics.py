"""What one rollout step measured: `StepStats`, and the token-weighted means it is made of.

A rollout step runs many micro-batches; each adds its token-weighted contribution to a metric
(`StepMeans.add_sum`: numerator and denominator as computed, on the device) and the step reads
them all once at the end: one host sync for every metric instead of one per micro-batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    logprob_abs_diff_mean: float
    pg_clipfrac: float
    num_tokens: int
    num_optimizer_steps: int
    tis_mean: float | None = None
    # Optimizer steps skipped because the loss or the gradient norm was not finite: the
    # weights (and AdamW's moments) were left as they were.
    num_skipped_steps: int = 0
    # Everything else worth a column in metrics.jsonl: token means over trained tokens (ppo_kl,
    # entropy, kl_loss, tis_*, mis_masked_frac), maxima (logprob_abs_diff_max, tis_max) and
    # the largest staleness among trained tokens (staleness_max_trained).
    metrics: dict[str, float] = field(default_factory=dict)


class StepMeans:
    """Token-weighted means (and maxima) of per-micro-batch metrics over a rollout step.

    Values may be device tensors: they stay there (no host sync per micro-batch) until
    `result()` reads them all at once. A maximum over nothing (-inf) is left out.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = defaultdict(float)
        self.weights: dict[str, Any] = defaultdict(float)
        self.maxima: dict[str, Any] = {}

    def add(self, name: str, value, weight) -> None:
        self.add_sum(name, value * weight, weight)

    def add_sum(self, name: str, total, count) -> None:
        """A mean's numerator and denominator, as computed (count may be a device tensor)."""
        self.sums[name] = self.sums[name] + total
        self.weights[name] = self.weights[name] + count

    def max(self, name: str, value) -> None:
        if name in self.maxima:
            old = self.maxima[name]
            value = (
                torch.maximum(old, value)
                if torch.is_tensor(value) or torch.is_tensor(old)
                else max(old, value)
            )
        self.maxima[name] = value

    def logprob_diff(self, lp: torch.Tensor, rollout: torch.Tensor, trained: torch.Tensor) -> None:
        """|trainer log-prob - rollout log-prob| over trained tokens (mean and max)."""
        diff = (lp - rollout).abs() * trained
        self.add_sum("logprob_abs_diff_mean", diff.sum(), trained.sum())
        self.max("logprob_abs_diff_max", torch.where(trained.any(), diff.max(), -math.inf))

    def staleness(self, loss_mask: torch.Tensor, versions: torch.Tensor, trained_version: int) -> None:
        """The largest staleness among the trained tokens whose version is known."""
        known = (loss_mask > 0) & (versions >= 0)
        stale = torch.where(known, trained_version - versions, torch.iinfo(torch.long).min).max()
        self.max("staleness_max_trained", torch.where(known.any(), stale.double(), -math.inf))

    def result(self) -> dict[str, float]:
        names = [*self.sums, *self.weights, *self.maxima]
        values = [*self.sums.values(), *self.weights.values(), *self.maxima.values()]
        tensors = [v for v in values if torch.is_tensor(v)]
        if tensors:  # one host sync for every metric of the step
            read = iter(torch.stack([t.detach().double().cpu().reshape(()) for t in tensors]).tolist())
            values = [next(read) if torch.is_tensor(v) else float(v) for v in values]
        n = len(self.sums)
        sums, weights, maxima = values[:n], values[n : 2 * n], values[2 * n :]
        out = {k: s / w for k, s, w in zip(names[:n], sums, weights, strict=True) if w > 0}
        out.update({k: m for k, m in zip(names[2 * n :], maxima, strict=True) if m != -math.inf})
        return out

    def stats(self, losses: list[float], norms: list[float], num_tokens: int, num_skipped: int) -> StepStats:
        """The step's `StepStats`: means of its optimizer steps' losses and norms, and every metric."""
        out = self.result()
        return StepStats(
            loss=sum(losses) / max(len(losses), 1),
            grad_norm=sum(norms) / max(len(norms), 1) if norms else math.nan,
            logprob_abs_diff_mean=out.pop("logprob_abs_diff_mean", 0.0),
            pg_clipfrac=out.pop("pg_clipfrac", 0.0),
            num_tokens=num_tokens,
            num_optimizer_steps=len(losses),
            tis_mean=out.pop("tis_mean", None),
            num_skipped_steps=num_skipped,
            metrics=out,
        )
