"""Shared-memory weights files (`weights/shm.py` writes them): where they live, whose they are, and
the sweep of a dead trainer's files. Torch-free, so the launcher can sweep at the end of a run.

A file's name carries its writer's pid namespace and pid: `slipstream-weights-<ns>-<pid>-<version>-<tag>`.
A trainer unlinks its files as they stop being needed and at exit; one killed with -9 cannot, so
whoever comes next on the host (the next trainer's exporter, the launcher once every service is
down) unlinks the files of writers in its own pid namespace that are gone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "slipstream-weights-"

log = logging.getLogger(__name__)


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return "0"


def writer_tag() -> str:
    """The name prefix of this process's files."""
    return f"{PREFIX}{pid_namespace()}-{os.getpid()}-"


def sweep_orphans() -> list[Path]:
    """Unlink the weights files of writers in this pid namespace whose process is gone; returns them."""
    gone = []
    ns = pid_namespace()
    for path in SHM_DIR.glob(f"{PREFIX}{ns}-*"):
        pid = path.name.removeprefix(f"{PREFIX}{ns}-").split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)
            gone.append(path)
    if gone:
        log.info("unlinked %d weights files in %s left by trainers that are gone", len(gone), SHM_DIR)
    return gone
