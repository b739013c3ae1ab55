"""The learning rate of each optimizer step: Megatron's schedule, as a pure function of the step.

    lr_at(n)  (n = optimizer steps already taken, so the first step trains at lr_at(0))

    warmup   n <= W (W > 0):  init + (lr - init) * n / W       --lr-warmup-iters / -fraction, --lr-warmup-init
    constant               :  lr                                --lr-decay-style constant
    after    n >  D        :  min_lr                            --lr-decay-iters (0: the run's steps)
    decay    r = (n - W) / (D - W)
             linear        :  min_lr + (lr - min_lr) * (1 - r)
             cosine        :  min_lr + (lr - min_lr) * (1 + cos(pi r)) / 2

These are Megatron-core's `OptimizerParamScheduler.get_lr` formulas (slime's Megatron backend
uses that class): the warmup test is `n <= W`, so with a warmup the first step trains at
--lr-warmup-init (0 by default) and step W+1 at exactly --lr; --lr-warmup-fraction is a share of
the decay span. Megatron counts in samples (steps x global batch); at a fixed global batch size
that is the same schedule. Steps skipped for a non-finite loss or gradient do not advance it
(Megatron's `skipped_iter`).

The only state is the count of optimizer steps taken: `LRScheduler.state_dict()` goes into
trainer_state.json, so a resumed run continues the same learning-rate sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from slipstream.config import TrainConfig


@dataclass(frozen=True)
class LRSchedule:
    lr: float  # the peak (--lr)
    min_lr: float = 0.0
    style: str = "constant"  # constant | linear | cosine
    warmup_steps: float = 0.0  # may be fractional under --lr-warmup-fraction, as in Megatron
    decay_steps: int = 0  # warmup included
    init_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.style != "constant" and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"--lr-decay-style {self.style}: the decay spans {self.decay_steps} optimizer steps, "
                f"not more than the {self.warmup_steps:g} of warmup (--lr-decay-iters, --lr-warmup-*)"
            )

    @classmethod
    def from_config(cls, t: TrainConfig, num_optimizer_steps: int) -> LRSchedule:
        """`num_optimizer_steps`: the whole run's, the default decay span (Megatron's train_iters)."""
        decay = t.lr_decay_iters or num_optimizer_steps
        warmup = t.lr_warmup_fraction * decay if t.lr_warmup_fraction is not None else t.lr_warmup_iters
        return cls(t.lr, t.min_lr, t.lr_decay_style, warmup, decay, t.lr_warmup_init)

    def lr_at(self, step: int) -> float:
        """The learning rate of the optimizer step taken after `step` others."""
        w, d = self.warmup_steps, self.decay_steps
        if w > 0 and step <= w:
            return self.init_lr + (self.lr - self.init_lr) * step / w
        if self.style == "constant":
            return self.lr
        if step > d:
            return self.min_lr
        ratio = (step - w) / (d - w)
        coeff = 1.0 - ratio if self.style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.lr - self.min_lr)


class LRScheduler:
    """Sets each optimizer step's learning rate from `LRSchedule` and counts the steps taken."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule):
        self.optimizer, self.schedule = optimizer, schedule
        self.num_steps = 0  # optimizer steps taken (skipped ones excluded)
        self._apply()

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step trains at."""
        return self.schedule.lr_at(self.num_steps)

    def step(self) -> None:
        """After a successful optimizer step."""
        self.num_steps += 1
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()  # the optimizer's restored param_groups carry the saved lr; the schedule rules
