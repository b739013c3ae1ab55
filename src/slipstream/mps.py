"""CUDA MPS for the processes that share a GPU (`--cuda-mps`).

Why. Processes on one GPU without MPS take turns: the GPU time-slices between their contexts, so
a kernel of the trainer waits out the rollout servers' and the other way round. A small model
feels it most: on the H200 a 25M-parameter trainer step took ~0.065 s of compute when the four
rollout servers beside it were idle and 0.096-0.123 s (medians of four runs) while they decoded.
Under MPS every process is a client of one server, and their kernels run side by side: the
median fell to 0.103-0.107 s in its first measurement (docs/benchmarks.md, issue 14).

The launcher starts a control daemon of its own (pipe and log directories inside the run
directory, so it never meets a system-wide one), gives every service the two directories, and
quits the daemon after the services are down. What MPS costs: a client's fatal GPU fault takes
down every client of the server, so the whole mesh stops on one process's crash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"


class MpsError(RuntimeError):
    pass


def start(run_dir: Path) -> dict[str, str]:
    """Start a private MPS control daemon; the environment its clients need."""
    control = shutil.which(CONTROL)
    if control is None:
        raise MpsError(f"--cuda-mps: {CONTROL} is not on PATH (it comes with the NVIDIA driver)")
    root = run_dir / "mps"
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [control, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise MpsError(
            f"--cuda-mps: {CONTROL} -d exited {done.returncode}: {said[-1] if said else 'no output'}"
        )
    return env


def stop(env: dict[str, str]) -> None:
    """Quit the daemon `start` began (its server exits once its clients have)."""
    control = shutil.which(CONTROL)
    if control is None:
        return
    subprocess.run(
        [control], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True, timeout=30
    )
