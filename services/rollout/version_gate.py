"""The version gate: when attached work may start on the engine, around weight swaps.

Two rules meet here. A work item names the oldest policy version it may be generated with
(`WorkItem.min_policy_version`, the coordinator's staleness bound): it waits until the engine
serves that version. And a weight swap decides what happens to work in flight, per the
partial-rollout mode: `drain` closes the gate and waits until every running item finished on
the old weights; `abort` closes it while the server aborts what runs (each comes back as a
partial) and swaps; `in_place` only closes it for the swap itself, the engine keeps decoding
with its KV cache. New work waits at the gate while it is closed.

Only attached (coordinator) work passes the gate; `Rollout.Generate` goes straight to the
engine. Everything runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class VersionGate:
    def __init__(self, version: Callable[[], int]):
        self._version = version  # the version the engine serves now
        self._cond = asyncio.Condition()
        self._closed = False
        self.num_running = 0  # items past the gate, not yet done

    async def enter(self, min_version: int, abandoned: Callable[[], bool]) -> bool:
        """Wait until the gate is open and the engine serves `min_version` or newer.

        Returns False, without entering, once `abandoned()` is true (call `poke` after setting it).
        """
        if not self._closed and self._version() >= min_version and not abandoned():
            # The common case, one item of a burst: what the condition would find at once. No
            # coroutine holds the lock across a suspension (waits release it), so this is what
            # taking it would see.
            self.num_running += 1
            return True
        async with self._cond:
            await self._cond.wait_for(
                lambda: abandoned() or (not self._closed and self._version() >= min_version)
            )
            if abandoned():
                return False
            self.num_running += 1
            return True

    async def leave(self) -> None:
        self.num_running -= 1
        if self._closed:  # a draining swap waits for the last one out; an open gate has nobody to tell
            async with self._cond:
                self._cond.notify_all()

    async def poke(self) -> None:
        """Wake waiters to re-check their `abandoned` condition."""
        async with self._cond:
            self._cond.notify_all()

    @asynccontextmanager
    async def swapping(self, drain: bool) -> AsyncIterator[None]:
        """Close the gate for a swap; with `drain`, first wait until nothing runs."""
        async with self._cond:
            self._closed = True
            if drain:
                await self._cond.wait_for(lambda: self.num_running == 0)
        try:
            yield
        finally:
            async with self._cond:
                self._closed = False
                self._cond.notify_all()
