"""The deploy path started twice on one persistent Redis (what `docker compose up` twice does),
issue 13 item 1.

A run stopped before its end resumes: its coordinator serves again from the journal and a
trainer with --load finishes it. A finished run is recognised: a coordinator or trainer started
again on its run id without --load exits 2 with one line naming the run and the step it finished
at (before, the coordinator resumed it and dispatched nothing, forever, and the trainer trained
from the base model and pointed checkpoints/latest back at its own step). `latest` never moves
back, and --load continues a finished run.
"""

from __future__ import annotations

import signal

from chaos_mesh import ChaosMesh, tiny_values, wait_for
from machine_speed import scaled

from slipstream.services.trainer.checkpoint import latest_step


def _last_line(service) -> str:
    lines = service.log().strip().splitlines()
    return lines[-1] if lines else ""


def test_a_finished_run_started_again_is_refused_and_an_unfinished_one_resumes(
    chaos_assets, tmp_path, redis_url
):
    model, prompts = chaos_assets
    run_dir = tmp_path / "run"
    values = tiny_values(model, prompts, run_dir, redis_url, num_rollout=1000)
    run_id, save_dir = values["run_id"], run_dir / "checkpoints"
    load = ("--load", str(save_dir))

    # 1. Stopped mid-run (SIGTERM: the trainer saves and commits), everything down.
    mesh = ChaosMesh(run_dir, dict(values))
    try:
        mesh.start_reward()
        mesh.start_coordinator()
        mesh.start_rollout(0)
        trainer = mesh.start_trainer()
        wait_for(mesh.metrics, 120, "a first training step")  # wait_for scales it
        trainer.popen.send_signal(signal.SIGTERM)
        assert trainer.popen.wait(timeout=scaled(30)) == 0, trainer.log()[-2000:]
    finally:
        mesh.stop()
    stopped_at = latest_step(save_dir)
    assert stopped_at >= 1

    # 2. Started again: not finished, so the coordinator resumes; the trainer (--load) finishes it.
    end = stopped_at + 2
    mesh = ChaosMesh(run_dir, dict(values, num_rollout=end))
    try:
        mesh.start_reward()
        mesh.start_coordinator()  # waits for it to serve: it resumed
        assert "resumed (incarnation" in mesh.services["coordinator"].log()
        mesh.start_rollout(0)
        trainer = mesh.start(
            "trainer", "trainer", "--coordinator-addr", mesh.services["coordinator"].addr, *load
        )
        assert trainer.popen.wait(timeout=scaled(120)) == 0, trainer.log()[-2000:]
    finally:
        mesh.stop()
    assert latest_step(save_dir) == end

    # 3. Started again once more, without --load: the finished run is refused, by each, in one line.
    finished = f"run {run_id!r} finished at step {end}; use a new --run-id or --load to continue"
    mesh = ChaosMesh(run_dir, dict(values, num_rollout=end))
    try:
        reward = mesh.start_reward()
        coordinator = mesh.start("coordinator", "coordinator", "--reward-addr", reward.addr, wait=False)
        assert coordinator.popen.wait(timeout=scaled(60)) == 2, coordinator.log()[-2000:]
        assert _last_line(coordinator) == f"slipstream coordinator: error: {finished}"
        # The trainer refuses too, before loading its model (its coordinator is gone).
        trainer = mesh.start("trainer", "trainer", "--coordinator-addr", "127.0.0.1:9", wait=False)
        assert trainer.popen.wait(timeout=scaled(60)) == 2, trainer.log()[-2000:]
        assert _last_line(trainer) == f"slipstream trainer: error: {finished}"
        assert latest_step(save_dir) == end  # nothing moved it

        # 4. --load continues it: the coordinator serves.
        mesh.start("coordinator", "coordinator", "--reward-addr", reward.addr, *load)
    finally:
        mesh.stop()


def test_latest_never_moves_back(chaos_assets, tmp_path):
    """A checkpoint of an older step than `latest` names is written, but never becomes latest."""
    import torch

    from slipstream.models.hf import load_model
    from slipstream.services.trainer.checkpoint import save_checkpoint

    model = load_model(chaos_assets[0], device="cpu", dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters())
    save_dir = tmp_path / "checkpoints"
    for step in (5, 0, 3):
        save_checkpoint(save_dir, step, model, optimizer, {"policy_version": 0})
    assert (save_dir / "step_000000").is_dir() and (save_dir / "step_000003").is_dir()
    assert (save_dir / "latest").read_text().strip() == "step_000005"
    save_checkpoint(save_dir, 6, model, optimizer, {"policy_version": 0})
    assert latest_step(save_dir) == 6
