"""SIGKILL the trainer of a live mesh (real rollout, real rewards) around a step, restart it with
--load: the run finishes, no group is trained twice and none is lost (scripts/check_ledger.py
passes), and nothing is left pending in the buffer.

Then the other way round: the trainer stays up while Redis is SIGKILLed and restarted (AOF on) and
the coordinator is SIGKILLed and restarted on its port; the trainer reconnects by itself, pushes
its weights again to the coordinator that lost them, and trains every group exactly once.

The kills are the crash points of `slipstream.faults` (SLIPSTREAM_CRASH_AT): after a step trained
but before its checkpoint (its groups must be trained again, once), and after a checkpoint but
before Redis heard of it (its groups must not be trained again). The figure printed (seconds
from a restart to its first trained step) is what docs/reliability.md reports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import redis
from chaos_mesh import ChaosMesh, tiny_values, wait_for
from machine_speed import scaled
from test_resume import NUM_GROUPS, _group

from slipstream.buffer.embedded import EmbeddedRedis, free_port
from slipstream.buffer.replay import ReplayBuffer

ROOT = Path(__file__).resolve().parents[2]


def _trainer(mesh: ChaosMesh, monkeypatch, *extra: str, crash_at: str = ""):
    if crash_at:
        monkeypatch.setenv("SLIPSTREAM_CRASH_AT", crash_at)
    else:
        monkeypatch.delenv("SLIPSTREAM_CRASH_AT", raising=False)
    try:
        return mesh.start(
            "trainer", "trainer", "--coordinator-addr", mesh.services["coordinator"].addr, *extra
        )
    finally:
        monkeypatch.delenv("SLIPSTREAM_CRASH_AT", raising=False)


def test_trainer_killed_twice_resumes_without_loss_or_duplicates(
    chaos_assets, tmp_path, redis_url, monkeypatch
):
    model, prompts = chaos_assets
    run_dir = tmp_path / "run"
    mesh = ChaosMesh(run_dir, tiny_values(model, prompts, run_dir, redis_url, num_rollout=6, save_interval=1))
    load = ("--load", str(run_dir / "checkpoints"))
    try:
        mesh.start_reward()
        mesh.start_coordinator()
        mesh.start_rollout(0)
        recover_s = []
        for i, (crash_at, extra) in enumerate(
            [("after_train:2", ()), ("after_checkpoint:4", load), ("", load)]
        ):
            steps_before = len({r["step"] for r in mesh.metrics()})
            t0 = time.monotonic()
            trainer = _trainer(mesh, monkeypatch, *extra, crash_at=crash_at)
            if i:  # a restart: how long until it trains again
                wait_for(lambda n=steps_before: len(mesh.metrics()) > n, 120, "a step after the restart")
                recover_s.append(time.monotonic() - t0)
            code = trainer.popen.wait(timeout=scaled(180))
            if crash_at:
                assert code == -9, (crash_at, code, trainer.log()[-3000:])
                assert f"fault injection: SIGKILL at {crash_at}" in trainer.log()
            else:
                assert code == 0, trainer.log()[-3000:]

        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["finished"]
        steps = sorted({r["step"] for r in mesh.metrics()})
        assert steps == list(range(1, 7))
        check = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "check_ledger.py"), str(run_dir)],
            capture_output=True,
            text=True,
        )
        print(check.stdout)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "trained 1x              24" in check.stdout  # 6 steps x 4 groups, each once
        r = redis.Redis.from_url(redis_url)
        groups = f"slipstream:{mesh.cfg.infra.effective_run_id}:groups"
        assert r.xpending(groups, "trainers")["pending"] == 0
        print("trainer restart to first step (s):", [round(s, 2) for s in recover_s])
    finally:
        mesh.stop()


def test_trainer_rides_out_redis_and_coordinator_restarts(chaos_assets, tmp_path):
    """Synthetic groups, no rollout server: what is tested is the trainer's side of a restart."""
    model, prompts = chaos_assets
    server = EmbeddedRedis(tmp_path / "redis").start()
    run_dir = tmp_path / "run"
    values = tiny_values(
        model, prompts, run_dir, server.url,
        rollout_batch_size=2, n_samples_per_prompt=2, num_rollout=NUM_GROUPS // 2,
        micro_batch_size=4, global_batch_size=4, max_staleness=100, save_interval=1,
        update_weights_interval=2, reconnect_timeout=30.0,
    )  # fmt: skip
    mesh = ChaosMesh(run_dir, values)
    buffer = ReplayBuffer(server.url, mesh.cfg.infra.effective_run_id)
    put = iter(range(NUM_GROUPS))

    def feed(n: int) -> None:
        for _ in range(n):
            buffer.put_group(_group(next(put)))

    try:
        mesh.start_reward()
        coordinator = mesh.start_coordinator()
        feed(4)  # two steps' worth (v1 pushed after step 2); then the trainer waits for data
        trainer = mesh.start_trainer()
        wait_for(lambda: len(mesh.metrics()) >= 2, 60, "two trained steps")
        time.sleep(1.5)  # past AOF everysec

        # Redis: SIGKILLed (no shutdown, no final AOF flush) under a trainer blocked reading it.
        server._proc.kill()
        server._proc.wait()
        server._proc = None
        time.sleep(1.0)
        server.start()  # same port, same AOF
        buffer = ReplayBuffer(server.url, mesh.cfg.infra.effective_run_id)

        # The coordinator: SIGKILLed; the trainer's step 3 report finds nobody, and keeps trying.
        coordinator.popen.kill()
        coordinator.popen.wait()
        feed(2)
        wait_for(lambda: "ReportProgress) unreachable" in trainer.log(), 30, "a report to a dead coordinator")
        time.sleep(1.0)
        mesh.start("coordinator", "coordinator", "--reward-addr", mesh.services["reward"].addr,
                   "--port", str(coordinator.port))  # fmt: skip
        feed(NUM_GROUPS - 6)
        code = trainer.popen.wait(timeout=scaled(120))
        assert code == 0, trainer.log()[-3000:]
        log = trainer.log()
        assert "Redis (replay buffer) reachable again" in log
        assert "(ReportProgress) reachable again" in log
        # It restarted holding the version number only: the trainer sent weights again, v1's when
        # the reply saying so came before v2 was due, else v2's (retried until it landed). The
        # reply is read a step late (`progress.py`), so which one depends on the timing.
        assert re.search(r"pushing v\d again|push of v\d did not land", log), log[-3000:]

        assert sorted({r["step"] for r in mesh.metrics()}) == list(range(1, NUM_GROUPS // 2 + 1))
        check = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "check_ledger.py"), str(run_dir)],
            capture_output=True,
            text=True,
        )
        assert "or twice: 0" in check.stdout, check.stdout + check.stderr
        assert f"trained 1x              {NUM_GROUPS}" in check.stdout, check.stdout
        assert buffer.num_pending() == 0
    finally:
        mesh.stop()
        buffer.close()
        server.stop()


def test_an_unreachable_redis_is_one_line_after_the_reconnect_timeout(chaos_assets, tmp_path, redis_url):
    model, prompts = chaos_assets
    mesh = ChaosMesh(tmp_path / "run", tiny_values(model, prompts, tmp_path / "run", redis_url))
    try:
        mesh.start_reward()
        mesh.start_coordinator()
        nobody = f"redis://127.0.0.1:{free_port()}/0"
        trainer = mesh.start("trainer", "trainer", "--coordinator-addr", mesh.services["coordinator"].addr,
                             "--redis-url", nobody, "--reconnect-timeout", "1.5")  # fmt: skip
        assert trainer.popen.wait(timeout=scaled(60)) == 1
        last = trainer.log().strip().splitlines()[-1]
        assert "Redis (replay buffer) unreachable for 2s (--reconnect-timeout)" in last, trainer.log()[-2000:]
        assert "Traceback" not in trainer.log()
    finally:
        mesh.stop()
