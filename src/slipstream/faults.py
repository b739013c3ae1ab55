"""Fault injection for crash tests: die by SIGKILL at a named point of a named step.

    SLIPSTREAM_CRASH_AT=after_checkpoint:3 slipstream trainer ...

kills the trainer right after step 3's checkpoint is written and before its entries are
acknowledged in Redis: the real thing a preemption does (no handler runs, nothing is flushed),
at a place a test chooses. Without the variable a crash point is one string comparison.

The trainer's points, in the order a step passes them: `after_read` (the batch is read, not
trained), `after_train` (trained, nothing saved), `mid_checkpoint` (the checkpoint's files are
written under their temporary name, not renamed), `after_checkpoint` (durable, Redis not yet
told), `after_commit` (Redis told).
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "SLIPSTREAM_CRASH_AT"
_AT = os.environ.get(ENV, "")  # read once: a process's crash point does not change under it


def crash_point(name: str, step: int) -> None:
    """SIGKILL this process when SLIPSTREAM_CRASH_AT is `<name>:<step>`; otherwise do nothing."""
    if _AT and _AT == f"{name}:{step}":
        print(f"fault injection: SIGKILL at {name}:{step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
