"""Admission control by hand: the staleness window, deadline-ordered storing, over-sampling.

The bound (slipstream.algorithms.staleness.StalenessBound): a group generated on version v must land among the first
(N + v + 1) x groups_per_version groups of the buffer, because the trainer takes
groups_per_version groups per version, in buffer order.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from slipstream.algorithms.staleness import StalenessBound
from slipstream.config import ConfigError, config_from_values
from slipstream.rollout_filters import check_reward_nonzero_std, keeps, load_filter
from slipstream.services.coordinator.admission import may_store
from slipstream.types import Sample


def test_accept_limit_by_hand():
    # (eta + version + 1) * batch: (1 + 0 + 1) * 4 = 8
    assert StalenessBound(1, 4, 100).accept_limit(0) == 8
    # eta = 0, nothing trained: exactly one batch may exist
    assert StalenessBound(0, 4, 100).accept_limit(0) == 4
    # two versions trained open two more batches: (0 + 2 + 1) * 4 = 12
    assert StalenessBound(0, 4, 100).accept_limit(2) == 12


def test_bound_limits_dispatch_and_the_run_total():
    bound = StalenessBound(max_staleness=1, groups_per_version=2, total_groups=6)
    assert bound.accept_limit(0) == 4  # (1 + 0 + 1) * 2
    assert bound.may_dispatch(0, num_accepted=0, num_running=3)
    assert not bound.may_dispatch(0, num_accepted=1, num_running=3)  # 4 groups exist: full
    assert bound.may_dispatch(1, num_accepted=1, num_running=3)  # a new version: room again
    assert bound.accept_limit(5) == 6  # never more than the run trains on
    assert not bound.may_dispatch(5, num_accepted=6, num_running=0)
    assert bound.may_dispatch(5, num_accepted=5, num_running=0)  # a lost group is replaced
    # update_weights_interval 2: four groups per version -> (0 + 0 + 1) * 4
    assert StalenessBound(0, 4, 100).accept_limit(0) == 4


def test_over_sampling_runs_extra_groups_and_the_window_closes_at_the_limit():
    # rollout_batch_size 2, over_sampling_batch_size 5: 3 extra groups may run
    bound = StalenessBound(max_staleness=0, groups_per_version=2, total_groups=10, over_sampling=3)
    assert bound.may_dispatch(0, num_accepted=0, num_running=4)
    assert not bound.may_dispatch(0, num_accepted=0, num_running=5)
    assert not bound.window_full(0, num_accepted=1)
    assert bound.window_full(0, num_accepted=2)  # batch complete: abort and recycle the rest
    assert not bound.window_full(1, num_accepted=2)  # the trainer moved on


def test_stale_positions_by_hand():
    bound = StalenessBound(max_staleness=1, groups_per_version=2, total_groups=100)
    # positions 0-1 train on version 0, 2-3 on 1, 4-5 on 2
    assert [bound.trained_version(p) for p in range(6)] == [0, 0, 1, 1, 2, 2]
    assert not bound.is_stale(3, oldest_token_version=0)  # 1 - 0 <= 1
    assert bound.is_stale(4, oldest_token_version=0)  # 2 - 0 > 1
    assert not bound.is_stale(4, oldest_token_version=1)


def test_trainer_filter_uses_the_same_bound():
    bound = StalenessBound(max_staleness=1, groups_per_version=2, total_groups=100)
    fresh, old = Sample(policy_versions=[3, 4]), Sample(policy_versions=[2, 4])
    assert bound.within([fresh], trained_version=4)
    assert not bound.within([fresh, old], trained_version=4)  # one token 2 versions old
    assert bound.within([Sample()], trained_version=9)  # versions unknown: not judged


@pytest.mark.parametrize("interval", [1, 2, 3])
@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_reuse_capacity_holds_every_group_still_within_the_bound(interval, max_staleness):
    """--update-weights-interval k > 1: a version lasts k steps, so a requeued group stays
    trainable for (N + 1) x k steps, not N + 1. Requeue every step's batch (the most a step
    can requeue), and count the requeued groups still within the bound at each step: the reuse
    stream must be able to hold all of them (it is capped at reuse_capacity, oldest dropped)."""
    rollout_batch_size = 4
    cfg = config_from_values(
        {
            "rollout_batch_size": rollout_batch_size,
            "update_weights_interval": interval,
            "max_staleness": max_staleness,
            "num_rollout": 50,
        }
    )
    bound = StalenessBound.from_config(cfg)
    requeued: list[int] = []  # the version each requeued group was generated on
    most_alive = 0
    for step in range(30):
        version = step // interval  # the policy version this step trains
        alive = [v for v in requeued if bound.within([Sample(policy_versions=[v])], version)]
        most_alive = max(most_alive, len(alive))
        requeued += [version] * rollout_batch_size  # this step's groups, generated on `version`
    assert most_alive == bound.reuse_capacity() - rollout_batch_size
    assert bound.reuse_capacity() >= most_alive + rollout_batch_size  # the step's own requeue too
    # The trainer's old cap, (N + 1) x rollout_batch_size, was short of that whenever k > 1:
    assert ((max_staleness + 1) * rollout_batch_size >= most_alive + rollout_batch_size) == (interval == 1)


def test_may_store_keeps_positions_for_earlier_deadlines():
    # nothing else waits: any group may take the next position
    assert may_store(0, 4, Counter([]))
    # A straggler due by 4 still runs; 3 groups stored. A later group (due by 6) taking
    # position 3 would push the straggler to position 4: too late. It waits.
    assert not may_store(3, 6, Counter([4]))
    assert may_store(2, 6, Counter([4]))  # position 2 leaves position 3 for the straggler
    # the straggler itself may always go
    assert may_store(5, 4, Counter([6, 6]))
    # two stragglers due by 4 (positions < 4) and a ready group due by 6:
    assert may_store(1, 6, Counter([4, 4]))  # it takes 1, the stragglers 2 and 3
    assert not may_store(2, 6, Counter([4, 4]))  # it would take 2, leaving only 3 for two stragglers
    # equal deadlines do not hold each other back (they are interchangeable)
    assert may_store(3, 4, Counter([4]))


def test_may_store_is_the_rule_for_every_earlier_deadline():
    # The rule as the docstring states it, checked deadline by deadline on random waiting sets.
    rng = random.Random(0)
    for _ in range(2000):
        waiting = [rng.randint(1, 12) for _ in range(rng.randint(0, 6))]
        accepted, deadline = rng.randint(0, 10), rng.randint(1, 12)
        rule = all(accepted + 1 + sum(w <= d for w in waiting) <= d for d in waiting if d < deadline)
        assert may_store(accepted, deadline, Counter(waiting)) == rule, (accepted, deadline, waiting)


def test_reward_nonzero_std_filter_by_hand():
    def group(*rewards):
        return [Sample(reward=r) for r in rewards]

    assert not check_reward_nonzero_std(None, group(1.0, 1.0, 1.0))
    assert not check_reward_nonzero_std(None, group(0.0, 0.0))
    assert check_reward_nonzero_std(None, group(0.0, 1.0, 1.0))
    assert check_reward_nonzero_std(None, group(0.0))  # one sample: nothing to compare
    assert keeps(True) and not keeps(type("Out", (), {"keep": False})())


def test_load_filter_accepts_colon_and_slime_dotted_paths():
    assert load_filter("slipstream.rollout_filters:check_reward_nonzero_std") is check_reward_nonzero_std
    assert load_filter("slipstream.rollout_filters.check_reward_nonzero_std") is check_reward_nonzero_std
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_filter("slipstream.rollout_filters:nope")
    with pytest.raises(ValueError, match="cannot import"):
        load_filter("no_such_module_xyz:f")


def test_sync_and_over_sampling_flags():
    cfg = config_from_values({"sync": True, "max_staleness": 3})
    assert cfg.rollout.max_staleness == 3  # the flag as given: --sync does not rewrite it
    assert cfg.rollout.effective_max_staleness == 0
    assert StalenessBound.from_config(cfg).max_staleness == 0
    with pytest.raises(ConfigError, match="--partial-rollout"):
        config_from_values({"sync": True, "partial_rollout": True})
    with pytest.raises(ConfigError, match="--over-sampling-batch-size"):
        config_from_values({"rollout_batch_size": 4, "over_sampling_batch_size": 3})
    assert config_from_values({"rollout_batch_size": 4}).rollout.effective_over_sampling_batch_size == 4
    over = config_from_values({"rollout_batch_size": 4, "over_sampling_batch_size": 6})
    assert over.rollout.effective_over_sampling_batch_size == 6
    assert StalenessBound.from_config(over).over_sampling == 2


# ---- the bound over a real run -------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_assets(tmp_path_factory):
    from mesh_fixtures import build_prompts, build_tiny_model

    d = tmp_path_factory.mktemp("admission")
    return build_tiny_model(d / "model"), build_prompts(d / "train.jsonl")


def _train(model, prompts, run_dir, redis_url, *extra: str) -> list[dict]:
    import json
    import subprocess
    import sys
    from pathlib import Path

    argv = [
        sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"),
        "--hf-checkpoint", str(model), "--prompt-data", str(prompts), "--run-dir", str(run_dir),
        "--redis-url", redis_url, "--rollout-batch-size", "2", "--n-samples-per-prompt", "4",
        "--rollout-max-response-len", "4", "--micro-batch-size", "8", "--lr", "1e-3",
        "--rollout-num-servers", "2", "--rollout-max-batch-size", "4", *extra,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("flags", "bound"), [(("--max-staleness", "1"), 1), (("--sync",), 0)])
def test_staleness_bound_holds_over_a_mesh_run(mesh_assets, tmp_path, redis_url, flags, bound):
    """Two rollout servers racing the trainer: every trained batch's oldest token is at most
    `bound` versions behind (read from metrics.jsonl, not assumed). --sync is exactly on-policy."""
    rows = _train(*mesh_assets, tmp_path / "run", redis_url, "--num-rollout", "8", *flags)
    assert [r["step"] for r in rows] == list(range(1, 9))
    staleness = [r["staleness_max"] for r in rows]
    assert all(s <= bound for s in staleness), staleness
    assert bound == 0 or any(s == bound for s in staleness)  # it did run ahead: the bound was exercised
