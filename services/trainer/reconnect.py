"""Calls that outlive a restart of the service they go to: retry with backoff, then one clear line.

A coordinator or Redis restart takes seconds; a trainer step takes longer than that, and a
trainer killed by it would lose everything since its last checkpoint. So every call the trainer
makes to Redis and to the coordinator goes through `Reconnect.call`: on a connection error (Redis)
or UNAVAILABLE (gRPC: nothing was received) it waits 0.5 s, doubling up to 5 s, and tries again
until `--reconnect-timeout`, then raises `Unreachable` naming what it could not reach. Only calls
that are safe to repeat come here: reads, ReportProgress (the coordinator keeps the maximum step),
acks and deletes; the commit's requeue appends are repeated at worst, and a repeated reuse entry
is a duplicate the trainer skips (`ledger.py`). PushWeights is not idempotent: `weight_push.py`
asks GetStatus whether a push whose reply was lost landed before pushing again.

Once a stop is asked for (SIGTERM, the launcher's Ctrl-C), the window shrinks to STOPPING_S: the
trainer then only finishes what it can reach, saves and exits, instead of waiting minutes on a
service that is gone (a stop that found it so abandons the step; nothing uncommitted counts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import redis

log = logging.getLogger("slipstream.trainer")

T = TypeVar("T")
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 5.0
STOPPING_S = 1.0  # the retry window once a stop is asked for


class Unreachable(RuntimeError):
    """A service stayed unreachable for the whole --reconnect-timeout."""


def retryable(e: BaseException) -> bool:
    if isinstance(e, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True  # BusyLoadingError (Redis replaying its AOF) is a ConnectionError too
    return isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    return f"{type(e).__name__}: {e}"


class Reconnect:
    def __init__(self, timeout: float, stop: threading.Event | None = None):
        self.configured = timeout
        self.stop = stop or threading.Event()  # set: the trainer is stopping
        self.recoveries: dict[str, int] = {}  # what -> times it came back after being unreachable

    @property
    def timeout(self) -> float:
        """The retry window: --reconnect-timeout, or STOPPING_S once a stop was asked for."""
        return min(self.configured, STOPPING_S) if self.stop.is_set() else self.configured

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()`, retried while `what` is unreachable, for up to the reconnect timeout."""
        started = None
        delay = FIRST_DELAY_S
        while True:
            try:
                result = fn()
                if started is not None:
                    log.info("%s reachable again after %.1fs", what, time.monotonic() - started)
                    self.recoveries[what] = self.recoveries.get(what, 0) + 1
                return result
            except Exception as e:
                if not retryable(e):
                    raise
                now = time.monotonic()
                if started is None:
                    started = now
                    log.warning(
                        "%s unreachable (%s); retrying for up to %.0fs", what, describe(e), self.timeout
                    )
                deadline = started + self.timeout  # shrinks when a stop is asked for meanwhile
                if now >= deadline:
                    why = "stopping" if self.stop.is_set() else "--reconnect-timeout"
                    raise Unreachable(
                        f"{what} unreachable for {self.timeout:.0f}s ({why}): {describe(e)}"
                    ) from None
                self.stop.wait(min(delay, max(deadline - now, 0.0)))  # a stop wakes it
                delay = min(delay * 2, MAX_DELAY_S)
