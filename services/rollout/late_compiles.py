"""Kernels a rollout server compiles after its warm-up, named in its log.

The warm-up (`Engine.warm_up`) is meant to compile every Triton kernel the serving path uses. One
that compiles later stalls the engine's thread while the coordinator's first batches wait: a
moment with a warm Triton cache, a second or more on a fresh machine (where each server's first
batches once kept the trainer waiting 4-6 s). Each such compile is logged with its time and
specialisation, so the next gap in the warm-up names itself.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def watch(server_id: str) -> bool:
    """From now on, log every Triton kernel this process compiles (or loads from the disk cache).
    False where Triton is not installed (a CPU build of torch: nothing compiles)."""
    try:
        from triton import knobs
    except ImportError:
        return False
    started: dict[str, float] = {}

    def before(*, key, **_) -> None:
        started[str(key)] = time.perf_counter()
        return None  # not True: True would skip the compile

    def after(*, key, fn, **_) -> None:
        took = time.perf_counter() - started.pop(str(key), time.perf_counter())
        # The key holds each argument's specialisation (dtype, alignment, 1 or a multiple of 16),
        # what differs from the warm-up's compile of the same kernel.
        log.warning("rollout server %s: Triton compiled %s after the warm-up, %.2f s; its key: %s",
                    server_id, fn.name, took, key)  # fmt: skip

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after
    return True
