"""Trainer crash and resume: killed at any point of a step, it neither skips nor repeats a group.

A fixed set of synthetic groups (with rollout log-probs) sits in a real Redis buffer; a real
coordinator process (no rollout server: it dispatches nothing, it takes the weight pushes and
progress reports) and a real trainer process (`python -m slipstream.services.trainer`, one torch
thread, CPU, --save-interval 1) train on them. The uninterrupted run's losses are the reference;
then a run with the same groups is SIGKILLed at every crash point in turn (SLIPSTREAM_CRASH_AT)
and resumed with --load each time: the loss curve, the learning-rate sequence (a warmup and a
cosine decay over two optimizer steps a step) and the final weights are the same, trained.jsonl
has every group exactly once, and nothing is left pending in the buffer.

Also: a learning rate that makes the weights overflow after one step gives non-finite losses;
--max-nonfinite-steps of them in a row stop the trainer with one line and a checkpoint of the
last good (finite) weights.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "chaos"))

from chaos_mesh import ChaosMesh, tiny_values  # noqa: E402

from mesh_fixtures import build_prompts, build_tiny_model  # noqa: E402
from slipstream.buffer.replay import ReplayBuffer  # noqa: E402
from slipstream.proto import types_pb2  # noqa: E402
from slipstream.services.trainer.schedule import LRSchedule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NUM_GROUPS, STEPS = 12, 6  # 2 groups a step
# Every crash point of a step, in the order a step passes them, each at its own step; the last
# one comes after the final step's commit (the resumed trainer has nothing left but to finish).
CRASHES = [
    ("after_read", 2),
    ("after_train", 3),
    ("mid_checkpoint", 4),
    ("after_checkpoint", 5),
    ("after_commit", 6),
]
# A schedule the resumed runs must continue exactly: 2 optimizer steps a step, 12 in the run.
SCHEDULE = dict(
    lr_decay_style="cosine", lr_warmup_iters=3, min_lr=1e-3, global_batch_size=2, micro_batch_size=2
)


def _check_ledger():
    spec = importlib.util.spec_from_file_location("check_ledger", ROOT / "scripts" / "check_ledger.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_ledger"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _group(i: int) -> types_pb2.Group:
    samples = []
    for j in range(2):
        r = 2 + (i + j) % 3
        s = types_pb2.Sample(
            uid=f"p{i}/{j}",
            tokens=[7, 8, 9] + [5 + (i * 5 + j * 3 + k) % 15 for k in range(r)],
            response_length=r,
            reward=float((i + j) % 2),
            status=types_pb2.SAMPLE_STATUS_COMPLETED,
        )
        s.rollout_log_probs.extend([-1.0 - 0.1 * k for k in range(r)])
        s.policy_versions.extend([0] * r)
        samples.append(s)
    return types_pb2.Group(group_id=f"p{i}", samples=samples)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    return build_tiny_model(d / "model"), build_prompts(d / "train.jsonl")


@pytest.fixture(scope="module")
def reward(assets, tmp_path_factory, redis_url):
    """One reward service for every run of this file (the coordinator wants one; nothing is scored)."""
    model, prompts = assets
    d = tmp_path_factory.mktemp("reward")
    mesh = ChaosMesh(d, tiny_values(model, prompts, d, redis_url), auth=False)
    mesh.start_reward()
    yield mesh.services["reward"]
    mesh.stop()


class Run:
    """One run id: its coordinator, the groups in its buffer, and trainer processes on it."""

    def __init__(self, assets, reward, run_dir: Path, redis_url: str, **over):
        model, prompts = assets
        values = tiny_values(
            model, prompts, run_dir, redis_url,
            rollout_batch_size=2, n_samples_per_prompt=2, num_rollout=STEPS,
            micro_batch_size=4, global_batch_size=4, lr=1e-2, save_interval=1,
            max_staleness=100, use_tis=True, device="cpu", reconnect_timeout=20.0,
        )  # fmt: skip
        values.update(over)
        self.mesh = ChaosMesh(run_dir, values, auth=False)
        self.mesh.services["reward"] = reward
        self.coordinator = self.mesh.start_coordinator()
        self.buffer = ReplayBuffer(redis_url, self.mesh.cfg.infra.effective_run_id)
        for i in range(NUM_GROUPS):
            self.buffer.put_group(_group(i))

    def trainer(self, *extra: str, crash_at: str = "") -> subprocess.CompletedProcess:
        argv = [
            sys.executable, "-m", "slipstream.services.trainer", "--config", str(self.mesh.config_path),
            "--coordinator-addr", self.coordinator.addr, "--port", "0", "--torch-threads", "1", *extra,
        ]  # fmt: skip
        env = {"SLIPSTREAM_CRASH_AT": crash_at} if crash_at else {}
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.mesh.metrics()}  # the last row of a step wins

    def lrs(self) -> dict[int, float]:
        return {r["step"]: r["lr"] for r in self.mesh.metrics()}

    def close(self) -> None:
        self.buffer.close()
        self.mesh.services.pop("reward")
        self.mesh.stop()


@pytest.fixture(scope="module")
def reference(assets, reward, tmp_path_factory, redis_url):
    """The uninterrupted run: its losses, and its final weights."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run = Run(assets, reward, run_dir, redis_url, **SCHEDULE)
    try:
        proc = run.trainer()
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses = run.losses()
        assert sorted(losses) == list(range(1, STEPS + 1))
        assert len(set(losses.values())) > 1  # it trains: the loss moves
        # Each row's lr is its step's last optimizer step's: optimizer step 2k - 1 (0-based).
        schedule = LRSchedule(lr=1e-2, min_lr=1e-3, style="cosine", warmup_steps=3, decay_steps=2 * STEPS)
        lrs = run.lrs()
        assert lrs == {k: pytest.approx(schedule.lr_at(2 * k - 1), rel=1e-12) for k in range(1, STEPS + 1)}
        weights = load_file(str(run_dir / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
        return losses, weights, lrs
    finally:
        run.close()


def test_killed_at_every_point_resumes_with_the_same_loss_curve(
    assets, reward, reference, tmp_path, redis_url
):
    """One run killed five times, once at each crash point (each at its own step), resumed each
    time with --load: one process start per crash instead of a fresh run per point."""
    ref_losses, ref_weights, ref_lrs = reference
    run_dir = tmp_path / "run"
    run = Run(assets, reward, run_dir, redis_url, **SCHEDULE)
    try:
        logs = []
        for point, step in CRASHES:
            extra = ("--load", str(run_dir / "checkpoints")) if (run_dir / "checkpoints").exists() else ()
            crashed = run.trainer(*extra, crash_at=f"{point}:{step}")
            assert crashed.returncode == -9, (point, crashed.stderr[-3000:])
            assert f"fault injection: SIGKILL at {point}:{step}" in crashed.stderr
            logs.append(crashed.stderr)
        resumed = run.trainer("--load", str(run_dir / "checkpoints"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        logs.append(resumed.stderr)
        # What each restart found: a lost step's entries to train again, or a commit to finish.
        for (point, _), log in zip(CRASHES, logs[1:], strict=True):
            if point == "after_checkpoint":
                assert "committed the 1 steps of the checkpoint" in log
            elif point != "after_commit":
                assert "2 pending entries from before the restart" in log, (point, log[-2000:])

        losses = run.losses()
        assert sorted(losses) == list(range(1, STEPS + 1))
        for step, loss in ref_losses.items():
            assert math.isclose(losses[step], loss, rel_tol=0, abs_tol=1e-6), (step, losses[step], loss)
        assert run.lrs() == ref_lrs  # the schedule continued where each checkpoint left it
        weights = load_file(str(run_dir / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
        weight_diff = max(float((weights[k] - v).abs().max()) for k, v in ref_weights.items())
        assert weight_diff <= 1e-6
        loss_diff = max(abs(losses[s] - ref_losses[s]) for s in ref_losses)
        print(
            f"resumed after 5 kills: max |loss - reference| {loss_diff:.1e}, max |weight - reference| {weight_diff:.1e}"
        )

        ledger = _check_ledger()
        steps = ledger.trained_steps(run_dir / "trained.jsonl")
        assert sorted(steps) == list(range(1, STEPS + 1))
        trained = sorted(g for s in steps.values() for g in s["group_ids"])
        assert trained == sorted(f"p{i}" for i in range(NUM_GROUPS))  # every group exactly once
        assert ledger.check(run_dir).trained_too_often == []  # (synthetic groups: none dispatched)
        assert run.buffer.num_pending() == 0
    finally:
        run.close()


def test_diverging_weights_stop_the_run_with_the_last_good_state(assets, reward, tmp_path, redis_url):
    """lr 1e10: step 1 is finite and moves every weight by ~1e10; from step 2 on the forward pass
    overflows and every loss is NaN. Real divergence, nothing injected."""
    run_dir = tmp_path / "run"
    run = Run(assets, reward, run_dir, redis_url, lr=1e10, max_nonfinite_steps=2, save_interval=0)
    try:
        proc = run.trainer()
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert "2 optimizer steps in a row had a non-finite loss or gradient" in last, proc.stderr[-3000:]
        assert "stopped at step 3" in last and str(run_dir / "checkpoints" / "step_000003") in last
        rows = run.mesh.metrics()
        assert [r["num_skipped_steps"] for r in rows] == [0, 1, 1]
        assert [r["num_nonfinite_in_a_row"] for r in rows] == [0, 1, 2]
        # The saved weights are step 1's (finite), and Redis was told about all three steps.
        state = json.loads((run_dir / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
        assert state["step"] == 3 and state["num_skipped_steps"] == 2
        weights = load_file(str(run_dir / "checkpoints" / "step_000003" / "model.safetensors"))
        assert all(v.isfinite().all() for v in weights.values())
        assert run.buffer.num_pending() == 0
    finally:
        run.close()


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_check_ledger_reports_and_fails_on_double_training_and_unknown_groups(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "check_ledger.py"), str(tmp_path)]
    step = lambda n, gids, times=None: {  # noqa: E731
        "step": n, "group_ids": gids, "entry_ids": [f"{n}-{i}" for i in range(len(gids))],
        "times_trained": times or [1] * len(gids),
    }  # fmt: skip
    # Step 2 was lost in a crash (first line) and retrained with other groups: the last line wins.
    _write(tmp_path / "trained.jsonl", [step(1, ["p0", "p1"]), step(2, ["p1", "p2"]), step(2, ["p2", "p3"])])
    proc = subprocess.run(script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dispatch.jsonl            missing" in proc.stdout and "OK" in proc.stdout

    events = [{"event": "dispatched", "group_id": f"p{i}", "uid": f"p{i}/0"} for i in range(6)]
    events += [{"event": "stored", "group_id": f"p{i}"} for i in range(5)]
    events += [
        {"event": "filtered", "group_id": "p5"},
        {"event": "dead_lettered", "group_id": "p4", "uid": "p4/1"},
    ]
    _write(tmp_path / "dispatch.jsonl", events)
    proc = subprocess.run(script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    out = proc.stdout
    assert "groups dispatched         6" in out and "in flight at the end    0" in out
    assert "stored, not trained     1" in out  # p4 waits in the buffer

    # A group trained twice as its first training, and one never dispatched: both fail.
    _write(tmp_path / "trained.jsonl", [step(1, ["p0", "p1"]), step(2, ["p0", "p9"])])
    proc = subprocess.run(script + ["--max-reuse", "2"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "or twice: 1 [p0]" in proc.stdout and "never dispatched: 1 [p9]" in proc.stdout
    # Reuse within --max-reuse (times 1 then 2) is fine; a third training is not.
    _write(tmp_path / "trained.jsonl", [step(1, ["p0"]), step(2, ["p0"], [2]), step(3, ["p0"], [3])])
    assert subprocess.run(script + ["--max-reuse", "3"], capture_output=True).returncode == 0
    assert subprocess.run(script + ["--max-reuse", "2"], capture_output=True).returncode == 1

    (tmp_path / "trained.jsonl").write_text('{"step": 1, "group_ids": ["p0"]}\n{"step": 2,\n{"step": 3}\n')
    proc = subprocess.run(script, capture_output=True, text=True)
    assert proc.returncode == 2 and "trained.jsonl:2: malformed JSON" in proc.stderr.strip().splitlines()[-1]


def test_duplicates_are_acked_and_skipped(redis_url, run_id):
    """At-least-once delivery (a regenerated group, a requeue repeated after a lost reply) meets
    an idempotent consumer: a group trained as often as allowed is acknowledged, never trained."""
    from slipstream.algorithms.staleness import StalenessBound
    from slipstream.config import config_from_values
    from slipstream.services.trainer.feed import Feed
    from slipstream.services.trainer.ledger import Consumption, StepRecord
    from slipstream.services.trainer.reconnect import Reconnect

    cfg = config_from_values(
        dict(rollout_batch_size=2, n_samples_per_prompt=2, micro_batch_size=2, max_reuse=2, max_staleness=9)
    )
    with ReplayBuffer(redis_url, run_id) as buf:
        feed = Feed(buf, Consumption(max_reuse=2), Reconnect(5.0), StalenessBound.from_config(cfg), "t")
        for i in (0, 1, 0, 2):  # p0 stored twice
            buf.put_group(_group(i))
        first = feed.collect(2, version=0)
        assert [g.group_id for _, g in first.fresh] == ["p0", "p1"]
        feed.consumption.record(StepRecord(1, ["p0", "p1"], [1, 1], [i for i, _ in first.fresh], []), [])
        buf.commit([], [], [(_group(0), 1), (_group(0), 1)])  # a requeue appended twice
        second = feed.collect(2, version=0)
        # the second p0 (fresh: wants training 1, p0 had it) is skipped; p2 and one p0 reuse train
        assert [g.group_id for _, g in second.fresh] == ["p2"]
        assert [(r.group.group_id, r.times_trained) for r in second.reused] == [("p0", 1)]
        assert second.duplicate_fresh and feed.consumption.num_duplicates_skipped == 1
        feed.consumption.record(StepRecord(2, ["p2", "p0"], [1, 2], [], []), [])
        buf.put_group(_group(3))
        late = threading.Timer(0.3, lambda: buf.put_group(_group(4)))
        late.start()
        third = feed.collect(2, version=0)  # p3 alone: reuse is read to fill
        late.join()
        assert [g.group_id for _, g in third.fresh] == ["p3", "p4"] and not third.reused
        assert feed.consumption.num_duplicates_skipped == 2  # the repeated requeue of p0
        # the duplicates were acknowledged (and the reuse one deleted) at once
        pending = {i for i, _ in buf.read_pending_groups("t")}
        trained = first.fresh + second.fresh + third.fresh
        assert pending == {i for i, _ in trained}
        assert buf.num_reuse() == 1  # the p0 entry trained in step 2: deleted at its commit
