"""What one launch tells the user and leaves in the run directory (issue 13 items 7 and 10):
the placement line, the config table in config.txt (after preflight, never on the console), one
log per service per run, and the one-line failures' exit codes. No service is started: the mesh
is stopped where it would start."""

from __future__ import annotations

import json

import pytest

import slipstream.launcher as launcher
from slipstream.cli import main as cli_main
from slipstream.log import rotate_log, rotate_logs


def _inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "label": "2"}\n')
    return ["--hf-checkpoint", str(model), "--prompt-data", str(data), "--run-dir", str(tmp_path / "run")]


@pytest.fixture
def stop_at_start(monkeypatch):
    """start_mesh fails at once: the launch is judged up to the first service."""

    def start_mesh(mesh):
        raise launcher.LaunchError("stopped by the test")

    monkeypatch.setattr(launcher, "start_mesh", start_mesh)
    monkeypatch.setattr(launcher, "report_at_end", lambda run_dir: None)


def _train(argv) -> int:
    with pytest.raises(SystemExit) as e:
        cli_main(["train", *argv])
    return e.value.code


def test_a_one_gpu_host_runs_colocated_and_says_so(tmp_path, monkeypatch, capsys, stop_at_start):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 1)
    assert _train(_inputs(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "placement: 1 GPU visible: trainer GPU 0, rollout-0 GPU 0; colocated" in err
    assert "one rollout server on the shared GPU" in err
    assert "weights over CUDA IPC" in err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["cluster"]["colocate"] is True  # what the trainer reads to export CUDA IPC handles


def test_no_colocate_given_by_the_user_wins(tmp_path, monkeypatch, capsys, stop_at_start):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 1)
    assert _train([*_inputs(tmp_path), "--no-colocate"]) == 1
    assert "not colocated; weights over gRPC bytes" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["cluster"]["colocate"] is False


def test_a_placement_the_host_cannot_hold_fails_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 1)
    argv = [*_inputs(tmp_path), "--rollout-num-gpus", "1", "--no-colocate"]
    assert _train(argv) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("slipstream: error: placement needs GPUs 0,1")
    )


def test_the_config_table_goes_to_the_run_dir_with_one_console_line(tmp_path, capsys, stop_at_start):
    _train([*_inputs(tmp_path), "--num-rollout", "3"])
    err = capsys.readouterr().err
    table = (tmp_path / "run" / "config.txt").read_text()
    assert "--num-rollout" in table and "--rollout-batch-size" in table and len(table.splitlines()) > 100
    assert "resolved config" not in err and "--rollout-batch-size" not in err  # the table stays out
    (summary,) = [line for line in err.splitlines() if line.startswith("config: ")]
    assert "--num-rollout 3" in summary and summary.endswith(str(tmp_path / "run" / "config.txt"))
    assert len(err.splitlines()) < 10


def test_a_preflight_error_is_the_only_output(tmp_path, capsys):
    argv = _inputs(tmp_path)
    argv[argv.index("--prompt-data") + 1] = str(tmp_path / "missing.jsonl")
    assert _train(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slipstream: error:") and "missing.jsonl" in err[0]


# ---- one log per service per run ---------------------------------------------------------------


def test_an_earlier_runs_log_is_moved_aside_and_numbered(tmp_path):
    log = tmp_path / "trainer.log"
    for run in range(1, 4):
        log.write_text(f"run {run}: error\n")
        assert rotate_log(log, keep=2) == tmp_path / f"trainer.{run}.log"
    assert not log.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer.2.log", "trainer.3.log"]
    assert (tmp_path / "trainer.3.log").read_text() == "run 3: error\n"


def test_a_launch_starts_every_service_log_empty(tmp_path, capsys, stop_at_start):
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "trainer.log").write_text("an earlier run's error\n")
    (logs / "rollout-0.log").write_text("an earlier run's error\n")
    (logs / "trainer.1.log").write_text("older\n")
    _train(_inputs(tmp_path))
    assert not (logs / "trainer.log").exists() and not (logs / "rollout-0.log").exists()
    assert (logs / "trainer.2.log").read_text() == "an earlier run's error\n"
    assert (logs / "rollout-0.1.log").exists() and (logs / "trainer.1.log").read_text() == "older\n"
    assert rotate_logs(logs) == []  # numbered logs stay as they are


# ---- exit codes: 2 could not start, 1 failed after it was up (slipstream.log) -------------------


def _exit_code(code: str) -> int:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode


def test_an_error_before_a_process_is_up_exits_2_and_after_exits_1():
    raise_it = "from slipstream.log import error_exit, mark_up\n{}error_exit('p', ValueError('bad'))"
    assert _exit_code(raise_it.format("")) == 2
    assert _exit_code(raise_it.format("mark_up()\n")) == 1


def test_a_trainer_given_a_missing_checkpoint_exits_2(tmp_path):
    import subprocess
    import sys

    argv = _inputs(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "slipstream.services.trainer", *argv, "--load", str(tmp_path / "nothing"),
         "--coordinator-addr", "127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0", "--port", "0",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("slipstream trainer: error: --load")
