"""The learning-rate schedule against Megatron-core's OptimizerParamScheduler formulas, by hand.

Megatron: with a warmup W, steps n <= W train at init + (lr - init) n / W; constant returns lr;
after the decay span D, min_lr; between, min_lr + coeff (lr - min_lr) with coeff = 1 - r
(linear) or (1 + cos(pi r)) / 2 (cosine), r = (n - W) / (D - W). n = optimizer steps taken.
"""

from __future__ import annotations

import math

import pytest
import torch

from slipstream.config import ConfigError, config_from_values
from slipstream.services.trainer.schedule import LRSchedule, LRScheduler


def _schedule(**kw) -> LRSchedule:
    return LRSchedule.from_config(config_from_values(kw).train, num_optimizer_steps=100)


def test_constant_is_the_default_and_never_moves():
    s = _schedule(lr=3e-4)
    assert [s.lr_at(n) for n in (0, 1, 50, 10_000)] == [3e-4] * 4


def test_linear_warmup_then_linear_decay_by_hand():
    s = LRSchedule.from_config(
        config_from_values(
            dict(lr=1.0, min_lr=0.1, lr_decay_style="linear", lr_warmup_iters=4, lr_decay_iters=14)
        ).train,
        num_optimizer_steps=999,  # --lr-decay-iters wins
    )
    # warmup from --lr-warmup-init 0: step n <= 4 trains at n / 4 (the first update at 0, as Megatron)
    assert [s.lr_at(n) for n in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # decay over 10 steps from 1.0 to 0.1: r = (n - 4) / 10
    for n in range(5, 15):
        assert s.lr_at(n) == pytest.approx(0.1 + 0.9 * (1 - (n - 4) / 10), abs=1e-12)
    assert s.lr_at(14) == pytest.approx(0.1)
    assert s.lr_at(15) == s.lr_at(1000) == 0.1  # past --lr-decay-iters: --min-lr


def test_cosine_with_a_warmup_fraction_and_the_run_as_decay_span():
    t = config_from_values(
        dict(lr=2e-5, min_lr=2e-6, lr_decay_style="cosine", lr_warmup_fraction=0.1, lr_warmup_init=1e-6)
    ).train
    s = LRSchedule.from_config(t, num_optimizer_steps=50)  # --lr-decay-iters 0: the whole run
    assert s.decay_steps == 50 and s.warmup_steps == pytest.approx(5.0)
    assert s.lr_at(0) == 1e-6
    assert s.lr_at(2) == pytest.approx(1e-6 + (2e-5 - 1e-6) * 2 / 5)
    assert s.lr_at(5) == pytest.approx(2e-5)
    for n in (6, 17, 27.5, 40, 50):
        r = (n - 5) / 45
        assert s.lr_at(n) == pytest.approx(2e-6 + (2e-5 - 2e-6) * 0.5 * (1 + math.cos(math.pi * r)))
    assert s.lr_at(27.5) == pytest.approx((2e-5 + 2e-6) / 2)  # the midpoint of the decay
    assert s.lr_at(51) == 2e-6


def test_flags_are_checked():
    with pytest.raises(ConfigError, match="cannot go with --lr-warmup-iters"):
        config_from_values(dict(lr_warmup_iters=3, lr_warmup_fraction=0.1))
    with pytest.raises(ConfigError, match="--min-lr"):
        config_from_values(dict(lr=1e-6, min_lr=1e-5))
    with pytest.raises(ValueError, match="not more than the 10 of warmup"):
        LRSchedule(lr=1.0, style="cosine", warmup_steps=10, decay_steps=10)


def test_scheduler_sets_the_optimizer_lr_and_resumes_from_its_state():
    schedule = LRSchedule(lr=1.0, min_lr=0.0, style="linear", warmup_steps=2, decay_steps=6)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=123.0)
    sched = LRScheduler(opt, schedule)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen == [schedule.lr_at(n) for n in range(4)]
    again = LRScheduler(torch.optim.AdamW([p], lr=123.0), schedule)
    again.load_state_dict(sched.state_dict())
    assert again.optimizer.param_groups[0]["lr"] == schedule.lr_at(4) == opt.param_groups[0]["lr"]
