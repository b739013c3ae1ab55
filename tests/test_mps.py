"""`--cuda-mps`: the launcher's private MPS daemon (`mps.py`). NVIDIA's control binary is stood in
for by a script on PATH that records how it was called; the launcher's refusals are checked as a
user meets them (one line, before anything starts)."""

import os
import stat

import pytest

from slipstream import launcher, mps
from slipstream.config import parse_config
from slipstream.placement import given_fields


def _fake_control(bin_dir, exit_code=0, said=""):
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / mps.CONTROL
    script.write_text(
        "#!/bin/sh\n"
        'echo "$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$(dirname "$0")/calls"\n'
        'cat >> "$(dirname "$0")/stdin"\n'
        f"echo '{said}' >&2\n"
        f"exit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir / "calls", bin_dir / "stdin"


def test_start_runs_a_private_daemon_and_stop_quits_it(tmp_path, monkeypatch):
    calls, stdin = _fake_control(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env = mps.start(tmp_path / "run")
    assert env == {
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "run" / "mps" / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "run" / "mps" / "log"),
    }
    assert all(os.path.isdir(path) for path in env.values())
    mps.stop(env)
    lines = calls.read_text().splitlines()
    want = f"pipe={env['CUDA_MPS_PIPE_DIRECTORY']} log={env['CUDA_MPS_LOG_DIRECTORY']}"
    assert lines == [f"-d {want}", f" {want}"]  # the daemon, then the quit on its own pipe
    assert stdin.read_text() == "quit\n"


def test_a_daemon_that_does_not_start_is_one_line(tmp_path, monkeypatch):
    _fake_control(tmp_path / "bin", exit_code=1, said="An instance of this daemon is already running")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(mps.MpsError, match=r"--cuda-mps: nvidia-cuda-mps-control -d exited 1: An instance"):
        mps.start(tmp_path / "run")


def _place(argv, monkeypatch, gpus):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(launcher, "model_parameters", lambda path: None)
    return launcher.place_on_host(parse_config(argv), given_fields(argv, {}))


def test_the_launcher_refuses_mps_without_a_gpu_or_without_the_binary(tmp_path, monkeypatch):
    with pytest.raises(launcher.LaunchError, match="--cuda-mps: this run has no GPU"):
        _place(["--cuda-mps"], monkeypatch, gpus=0)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.raises(launcher.LaunchError, match="--cuda-mps: nvidia-cuda-mps-control is not on PATH"):
        _place(["--cuda-mps"], monkeypatch, gpus=1)
    _fake_control(tmp_path)
    assert _place(["--cuda-mps"], monkeypatch, gpus=1).colocate  # one GPU: trainer and rollout share it
