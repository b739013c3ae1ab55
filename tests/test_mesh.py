"""The whole mesh as separate processes: launcher, embedded-style Redis, reward, coordinator,
two rollout servers, trainer — real gRPC on loopback, real Redis, FP8 weights on the wire.

Marked slow: each test starts ~6 processes and runs a few training steps on a tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from machine_speed import scaled

from mesh_fixtures import build_prompts, build_tiny_model
from slipstream.launcher import REPORT_TIMEOUT_S

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("mesh")
    return build_tiny_model(d / "model"), build_prompts(d / "train.jsonl")


def _argv(model: Path, prompts: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--hf-checkpoint",
        str(model),
        "--prompt-data",
        str(prompts),
        "--run-dir",
        str(run_dir),
        "--rollout-batch-size",
        "4",
        "--n-samples-per-prompt",
        "4",
        "--num-rollout",
        "3",
        "--rollout-max-response-len",
        "4",
        "--global-batch-size",
        "8",
        "--micro-batch-size",
        "8",
        "--lr",
        "1e-3",
        "--rollout-num-servers",
        "2",
        *extra,
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_mesh_trains_and_syncs_weights(assets, tmp_path, redis_url):
    model, prompts = assets
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        _argv(model, prompts, run_dir, "--redis-url", redis_url),
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "policy_version",
        "reward_mean",
        "accuracy",
        "response_len_mean",
        "staleness_mean",
        "staleness_max",
        "logprob_abs_diff_mean",
        "loss",
        "grad_norm",
        "tokens_per_s",
        "elapsed_s",
    ):
        assert all(key in r for r in rows), key
    assert rows[-1]["policy_version"] == 3
    assert all(r["num_samples"] == 16 for r in rows)
    for r in rows:  # the step's parts add up to the step (tokens_per_s is over the whole step)
        parts = r["wait_data_s"] + r["compute_s"] + r["push_weights_s"] + r["commit_s"]
        assert r["commit_s"] > 0 and parts == pytest.approx(
            r["num_trained_tokens"] / r["tokens_per_s"], rel=1e-6
        )
    # Rewards were computed by the reward service: the math rule gives exactly 0 or 1.
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)

    summary = json.loads((run_dir / "summary.json").read_text())
    # Every rollout server received, verified and applied every pushed version (a fresh run waits
    # for the servers the launcher started before dispatching: Streams.fleet_ready).
    assert summary["rollout_server_versions"] == {"rollout-0": 3, "rollout-1": 3}

    # Every buffer entry was acknowledged once its step was done.
    r = redis.Redis.from_url(redis_url)
    run_id = run_dir.resolve().name
    streams = [k.decode() for k in r.keys(f"slipstream:{run_id}:*")]
    group_stream = next(k for k in streams if k.endswith("groups"))
    pending = r.xpending(group_stream, "trainers")
    assert pending["pending"] == 0
    # ...and trimmed away: what is left was never delivered (stored past the last step).
    info = next(g for g in r.xinfo_groups(group_stream) if g["name"] == b"trainers")
    last = tuple(int(x) for x in info["last-delivered-id"].decode().split("-"))
    left = [tuple(int(x) for x in i.decode().split("-")) for i, _ in r.xrange(group_stream)]
    assert all(i > last for i in left), (last, left)
    assert last > (0, 0)

    assert (run_dir / "config.json").exists()
    assert (run_dir / "checkpoints" / "latest").exists()
    for name in ("reward", "coordinator", "rollout-0", "rollout-1", "trainer"):
        assert (run_dir / "logs" / f"{name}.log").exists()
    pids = json.loads((run_dir / "pids.json").read_text())
    assert not [n for n, pid in pids.items() if _alive(pid)]

    # Start-up and shutdown (issue 13 item 8): every service started before the first was ready
    # (they used to start one after another), and all were down soon after the last step (5 s
    # on this box before: the trainer's and every service's interpreter teardown, then the
    # launcher's staggered stop). timeline.json is what the GPU measurement reads.
    timeline = json.loads((run_dir / "timeline.json").read_text())
    at = {e["event"]: e["s"] for e in timeline["events"]}
    assert at["services started"] < min(at[f"{n} ready"] for n in ("reward", "coordinator", "trainer"))
    assert at["launch"] == 0 < at["redis ready"] < at["first step"] <= at["last step"] < at["all stopped"]
    assert timeline["last_step_to_all_stopped_s"] < scaled(3), timeline


def _launch_until_first_step(model: Path, prompts: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    """Start the launcher and return once the trainer has written its first metrics row."""
    launcher = subprocess.Popen(
        _argv(model, prompts, run_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + scaled(180)
    try:
        while not (metrics.exists() and metrics.read_text().strip()):
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run never finished a step"
            time.sleep(0.2)
    except BaseException:
        launcher.kill()
        raise
    return launcher


def _stderr_at_exit(launcher: subprocess.Popen, timeout: float) -> str:
    """The launcher's stderr once it has exited; a run still going after `timeout` fails the
    test with what it printed so far."""
    try:
        return launcher.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        launcher.kill()
        err = launcher.communicate()[1]
        pytest.fail(f"the run did not end within {timeout:.0f} s; its stderr:\n{err[-3000:]}")


@pytest.mark.parametrize("victim", ["rollout-1", "coordinator", "reward", "trainer", "redis"])
def test_killing_a_service_stops_the_run(assets, tmp_path, victim):
    model, prompts = assets
    run_dir = tmp_path / "run"
    launcher = _launch_until_first_step(model, prompts, run_dir, "--num-rollout", "1000")
    try:
        pids = json.loads((run_dir / "pids.json").read_text())
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        # Every service down within the bound (the trainer saving what it trained first); the
        # report is written after that, in a child the launcher bounds by REPORT_TIMEOUT_S.
        while [n for n, pid in pids.items() if _alive(pid)] and time.monotonic() - killed_at < scaled(30):
            time.sleep(0.05)
        stopped_in = time.monotonic() - killed_at
        _, err = launcher.communicate(timeout=scaled(30) + REPORT_TIMEOUT_S)
        assert stopped_in < scaled(10), (stopped_in, err[-2000:])
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode not in (0, None)
    assert err.strip(), "the launcher printed nothing"
    assert victim in err.strip().splitlines()[-1]
    assert not [n for n, pid in pids.items() if _alive(pid)]


def test_max_restarts_brings_dead_services_back(assets, tmp_path):
    """Supervised like a Kubernetes pod: the reward service and a rollout server are SIGKILLed
    after the first step, the launcher starts each again on its port, and the run finishes.

    Twelve rollouts: one version stale, at most the first few have been scored when the test
    kills (it sees the first step up to 0.2 s late), so the rest need the reward service back.
    With six, the buffer sometimes held every remaining step's groups already and the run ended
    before the launcher saw a death (a restart that was never needed, not a failure to restart).
    The wait for the run's end is bounded by `scaled` like the test's other waits; what a
    timeout left of the launcher's stderr is in the failure."""
    model, prompts = assets
    run_dir = tmp_path / "run"
    launcher = _launch_until_first_step(model, prompts, run_dir, "--num-rollout", "12", "--max-restarts", "1")
    try:
        before = json.loads((run_dir / "pids.json").read_text())
        for victim in ("reward", "rollout-1"):
            os.kill(before[victim], signal.SIGKILL)
        err = _stderr_at_exit(launcher, scaled(180))
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err[-3000:]
    after = json.loads((run_dir / "pids.json").read_text())
    for victim in ("reward", "rollout-1"):
        assert after[victim] != before[victim], f"{victim} was not restarted"
        assert any(
            line.startswith(f"slipstream: {victim} died (killed by SIGKILL)")
            and "restarting it (1/1)" in line
            for line in err.splitlines()
        ), err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True


def test_bad_input_gives_one_line(assets, tmp_path):
    model, prompts = assets
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "label": "2"}\n{"prompt": "2+2=", "label": \n')
    cases = {
        "malformed": (_argv(model, bad, tmp_path / "r1"), "bad.jsonl:2: malformed JSON"),
        "checkpoint": (_argv(tmp_path / "nope", prompts, tmp_path / "r2"), "--hf-checkpoint"),
        "rm-url": (_argv(model, prompts, tmp_path / "r3", "--rm-url", "http://127.0.0.1:9/rm"), "--rm-url"),
    }
    for name, (argv, needle) in cases.items():
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(120))
        assert proc.returncode != 0, name
        last = proc.stderr.strip().splitlines()[-1]
        assert needle in last, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, name


def test_ctrl_c_saves_commits_and_resumes_exactly_once(assets, tmp_path):
    """Ctrl-C at the default --save-interval 0 (issue 13 item 2): intake stops, the trainer saves
    the steps it trained and commits them, then the rest stop; the launcher says so. A run resumed
    with --load trains every dispatched group at most once (scripts/check_ledger.py)."""
    model, prompts = assets
    run_dir = tmp_path / "run"
    launcher = _launch_until_first_step(model, prompts, run_dir, "--num-rollout", "1000")
    try:
        pids = json.loads((run_dir / "pids.json").read_text())
        launcher.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the launcher
        _, err = launcher.communicate(timeout=scaled(60) + REPORT_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGINT, err[-3000:]
    assert not [n for n, pid in pids.items() if _alive(pid)]
    lines = [line for line in err.splitlines() if line.startswith("slipstream: stop")]
    assert lines[0].startswith("slipstream: stopping: intake stopped; trainer saving step "), err[-3000:]
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    path = run_dir / "checkpoints" / saved
    assert lines[1] == f"slipstream: stopping: trainer saved {path}; stopping the other services"
    assert lines[2].startswith("slipstream: stopped in ")
    step = int(saved.removeprefix("step_"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert step == rows[-1]["step"] >= 1  # every step it trained is in the checkpoint
    trained = [json.loads(line)["step"] for line in (run_dir / "trained.jsonl").read_text().splitlines()]
    assert sorted(set(trained)) == list(range(1, step + 1))  # ...and committed

    resumed = subprocess.run(
        _argv(model, prompts, run_dir, "--num-rollout", str(step + 2), "--load", str(run_dir / "checkpoints")),
        capture_output=True, text=True, timeout=scaled(300),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step + 2:06d}"
    ledger = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_ledger.py"), str(run_dir)],
        capture_output=True,
        text=True,
    )
    assert ledger.returncode == 0, ledger.stdout + ledger.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_launcher_leaves_no_process(assets, tmp_path, sig):
    """SIGTERM stops every service gracefully; even a SIGKILLed launcher leaves no orphan."""
    model, prompts = assets
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        _argv(model, prompts, run_dir, "--num-rollout", "1000"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + scaled(180)
        while not (metrics.exists() and metrics.read_text().strip()):
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        pids = json.loads((run_dir / "pids.json").read_text())
        launcher.send_signal(sig)
        launcher.wait(timeout=scaled(30))
    finally:
        if launcher.poll() is None:
            launcher.kill()
    if sig == signal.SIGTERM:
        assert launcher.returncode == 128 + signal.SIGTERM
    deadline = time.monotonic() + scaled(10)
    while [n for n, pid in pids.items() if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [n for n, pid in pids.items() if _alive(pid)]


def test_mesh_with_a_two_rank_fsdp2_trainer(assets, tmp_path):
    """--actor-num-gpus-per-node 2 on CPU: torchrun starts two gloo ranks of the FSDP2 trainer."""
    model, prompts = assets
    run_dir = tmp_path / "run"
    argv = _argv(model, prompts, run_dir, "--actor-num-gpus-per-node", "2", "--micro-batch-size", "4")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(300))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["policy_version"] == 3
    assert summary["rollout_server_versions"] == {"rollout-0": 3, "rollout-1": 3}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["num_optimizer_steps"] == 2 for r in rows)
