"""The circuit breaker of a remote reward endpoint: an outage is said at once and burns nothing.

An *outage failure* is an attempt that got no answer from the endpoint: connection refused or
reset, no reply within `--rm-timeout`, an unknown host, or a gateway's 502/503/504 (the model
behind it is gone). `FAILURES_TO_OPEN` of them in a row, across all samples, open the breaker:
the console says which endpoint and what error, and every scoring attempt fails at once with
`EndpointDown` (the service answers `Score` with UNAVAILABLE, and the coordinator pauses
admission instead of dead-lettering samples: the samples are not at fault). Meanwhile one probe,
a real request (the last one that failed), goes to the endpoint with exponential backoff; the
first answer of any kind closes the breaker. Any answer (a reward, a 4xx, a 500) while closed
resets the count: an endpoint that answers is up, whatever it answers.

Why here and not in the coordinator: only the reward service sees the endpoint, its URL and the
reason of each failed attempt, and only it can tell "the endpoint is down" (pause) from "this
sample cannot be scored" (dead-letter). The coordinator owns what follows from it: admission,
and failing the run after `--reward-outage-timeout`.

Also said at once: requests waiting longer than `stall_s` without any answer (a frozen endpoint
accepts connections and never replies; its timeouts come only after `--rm-timeout`).

Everything here runs on the service's event loop; the HTTP itself runs in worker threads.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

from slipstream.console import console_log

log = logging.getLogger(__name__)
console = console_log()

FAILURES_TO_OPEN = 3
PROBE_FIRST_S, PROBE_MAX_S = 0.5, 10.0
STALL_WARN_S = 10.0  # no answer for this long while requests wait: said on the console


class EndpointDown(Exception):
    """The endpoint's breaker is open: the sample was not scored, through no fault of its own."""


class Breaker:
    def __init__(
        self,
        url: str,
        probe: Callable[[], Awaitable[bool]],
        threshold: int = FAILURES_TO_OPEN,
        probe_first_s: float = PROBE_FIRST_S,
        probe_max_s: float = PROBE_MAX_S,
    ):
        self.url = url
        self.probe = probe  # True when the endpoint answered
        self.threshold = threshold
        self.probe_first_s, self.probe_max_s = probe_first_s, probe_max_s
        self.failures = 0  # outage failures in a row
        self.last_error = ""
        self.opened_at: float | None = None
        self.num_opened = 0
        self._prober: asyncio.Task | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def describe(self) -> str:
        down_s = time.monotonic() - self.opened_at if self.opened_at is not None else 0.0
        return f"reward endpoint {self.url} down for {down_s:.0f}s: {self.last_error}; probing it"

    def check(self) -> None:
        """Raise EndpointDown while the breaker is open."""
        if self.is_open:
            raise EndpointDown(self.describe())

    def answered(self) -> None:
        """The endpoint answered (a reward or an error of its own)."""
        self.failures = 0
        if self.is_open:
            self._close()

    def outage(self, error: str) -> None:
        """An attempt got no answer."""
        self.failures += 1
        self.last_error = error
        if not self.is_open and self.failures >= self.threshold:
            self.opened_at = time.monotonic()
            self.num_opened += 1
            console.warning(
                "reward endpoint %s down: %s (%d attempts in a row); scoring paused, probing it",
                self.url,
                error,
                self.failures,
            )
            self._prober = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        delay = self.probe_first_s
        while self.is_open:
            await asyncio.sleep(delay)
            if await self.probe():
                if self.is_open:
                    self._close()
                return
            log.info("probe of %s failed: %s; next in %.1fs", self.url, self.last_error, delay)
            delay = min(delay * 2, self.probe_max_s)

    def _close(self) -> None:
        down_s = time.monotonic() - (self.opened_at or time.monotonic())
        self.opened_at, self.failures = None, 0
        console.info("reward endpoint %s answers again after %.1fs down; scoring resumed", self.url, down_s)

    def close(self) -> None:
        """Stop probing (the service stops)."""
        if self._prober is not None:
            self._prober.cancel()


class StallWatch:
    """Says on the console when requests have waited `stall_s` without any answer."""

    def __init__(self, url: str, stall_s: float, timeout: float):
        self.url, self.stall_s, self.timeout = url, stall_s, timeout
        self.waiting: dict[int, float] = {}  # request -> when it was sent
        self._ids = itertools.count()
        self._warned = False
        self._task: asyncio.Task | None = None

    def sent(self) -> int:
        token = next(self._ids)
        self.waiting[token] = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())
        return token

    def done(self, token: int, answered: bool) -> None:
        self.waiting.pop(token, None)
        if answered:
            self._warned = False

    async def _watch(self) -> None:
        while self.waiting:
            await asyncio.sleep(min(1.0, self.stall_s / 4))
            if not self.waiting or self._warned:
                continue
            oldest = time.monotonic() - min(self.waiting.values())
            if oldest >= self.stall_s:
                self._warned = True
                console.warning(
                    "reward endpoint %s: no answer for %.0fs (%d requests waiting; --rm-timeout %gs)",
                    self.url,
                    oldest,
                    len(self.waiting),
                    self.timeout,
                )

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
