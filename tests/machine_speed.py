"""How slow this machine is right now, and wait bounds scaled by it: `scaled(30)`.

A bound in a test ("the coordinator serves within 30 s") is written for an idle 2-core machine.
On a loaded one (another suite, a build, a mesh test's own six processes) the same work takes
several times longer, and a fixed bound fails without anything being wrong. So every wait bound
goes through `scaled`: the bound times the machine's slowdown, never less than the bound itself.

The slowdown is the larger of
- a fixed CPU workload's time against its time on an idle 2-core box (measured once per process:
  what a time slice is worth under the load at start), and
- the load average per core now (read at every call: load that came later counts too),
capped at `MAX_SLOWDOWN`, so a real hang still fails, only later. `SLIPSTREAM_TEST_SLOWDOWN=4`
forces a factor (to try a loaded machine's bounds, or to pin them).
"""

from __future__ import annotations

import functools
import os
import statistics
import time

IDLE_WORKLOAD_S = 0.06  # the workload's median on an idle 2-core box (0.04-0.05 s, with a margin)
MAX_SLOWDOWN = 8.0


def _workload() -> float:
    start = time.perf_counter()
    x = 0
    for i in range(600_000):
        x += i * i % 7
    return time.perf_counter() - start


@functools.cache
def measured_slowdown() -> float:
    """The fixed workload's median of 5 runs against an idle box's (~0.25 s once per process)."""
    return statistics.median(_workload() for _ in range(5)) / IDLE_WORKLOAD_S


def load_per_core() -> float:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def slowdown() -> float:
    """How many times slower than an idle 2-core box this machine is now (1 to MAX_SLOWDOWN)."""
    forced = os.environ.get("SLIPSTREAM_TEST_SLOWDOWN")
    if forced:
        return max(1.0, float(forced))
    return min(MAX_SLOWDOWN, max(1.0, measured_slowdown(), load_per_core()))


def scaled(seconds: float) -> float:
    """`seconds` (a bound that holds on an idle 2-core box) for this machine now."""
    return seconds * slowdown()
