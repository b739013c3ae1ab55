"""The journal writer: the coordinator's in-memory ledger, copied to Redis off the event loop.

The ledger in memory is the truth while the coordinator runs; Redis is its journal, read only
when a coordinator starts on a run that has one, or after Redis itself restarted. The pipeline
calls `mark(group_id)` when a group changes (admitted, a result in, a partial parked or taken
back), `drop(group_id)` when it leaves without being stored (filtered), and `touch()` when only
counters moved; one writer task coalesces whatever accumulated into a single MULTI/EXEC per
round (`CoordinatorStore.write`), in a worker thread.

Ordering with the store. The writer and the store path take the same lock, and snapshots are
built *inside* it, so a group being stored is either journaled before its store transaction
(which then deletes it) or no longer in assembly when the snapshot is taken: the journal can
never put back a group the buffer already holds. The store transaction also carries whatever
the journal had pending (`store_groups`): the buffer never gets ahead of the journal, so a group
in the buffer was always admitted under a journaled cursor (otherwise a crash could admit its
prompt again and store it twice).

A failed write (Redis down) keeps the changes dirty and is retried; after a Redis restart the
coordinator reloads from Redis anyway (recovery.py builds a new pipeline, with a new journal),
so nothing here needs to be smarter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis

from slipstream.buffer.coordinator_store import CoordinatorCounters, CoordinatorStore
from slipstream.proto import coordinator_pb2, types_pb2
from slipstream.services.coordinator.groups import GroupState

log = logging.getLogger(__name__)

RETRY_S = 0.5
COALESCE_S = 0.02  # let a burst of results land in one write


def to_record(group: GroupState, parked: set[str]) -> coordinator_pb2.JournalGroup:
    record = coordinator_pb2.JournalGroup(
        group_id=group.group_id, samples=group.samples, version=group.version, deadline=group.deadline
    )
    for index, sample in group.results.items():
        record.results[index].CopyFrom(sample)
    record.parked.extend(i for i, s in enumerate(group.samples) if s.uid in parked)
    return record


def from_record(record: coordinator_pb2.JournalGroup) -> GroupState:
    samples = []
    for s in record.samples:
        copy = types_pb2.Sample()
        copy.CopyFrom(s)
        samples.append(copy)
    return GroupState(
        record.group_id,
        samples,
        results={i: record.results[i] for i in record.results},
        version=record.version,
        deadline=record.deadline,
    )


Snapshotter = Callable[[set[str]], tuple[CoordinatorCounters, dict[str, bytes]]]


class StoreInDoubt(Exception):
    """A store transaction met a Redis error: whether it ran is unknown (only Redis can tell)."""


class Journal:
    def __init__(self, store: CoordinatorStore, snapshot: Snapshotter, lock: asyncio.Lock):
        self.store = store
        self.snapshot = snapshot  # dirty group ids -> (counters, {group id: record bytes} still in assembly)
        self.lock = lock
        self.dirty: set[str] = set()
        self.dropped: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.num_writes = 0
        self.num_failed_writes = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def mark(self, group_id: str) -> None:
        self.dirty.add(group_id)
        self._wake.set()

    def drop(self, group_id: str) -> None:
        self.dirty.discard(group_id)
        self.dropped.add(group_id)
        self._wake.set()

    def touch(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(COALESCE_S)
            self._wake.clear()
            if not await self.flush():
                await asyncio.sleep(RETRY_S)
                self._wake.set()

    def take(self) -> tuple[set[str], set[str], CoordinatorCounters, dict[str, bytes]]:
        """What is pending, as a write (call it holding the lock): (dirty, dropped, counters, records)."""
        dirty, dropped = self.dirty, self.dropped
        self.dirty, self.dropped = set(), set()
        counters, put = self.snapshot(dirty)
        return dirty, dropped, counters, put

    def give_back(self, dirty: set[str], dropped: set[str]) -> None:
        """A write of `take()` failed: keep its changes pending."""
        self.dirty |= dirty
        self.dropped |= dropped

    async def flush(self) -> bool:
        """Write what changed now; False when Redis refused (the changes stay pending)."""
        async with self.lock:
            dirty, dropped, counters, put = self.take()
            try:
                await asyncio.to_thread(self.store.write, counters, put, sorted(dropped))
            except redis.exceptions.RedisError as e:
                self.num_failed_writes += 1
                if self.num_failed_writes == 1 or self.num_failed_writes % 20 == 0:
                    log.warning("journal write failed (%d so far): %s", self.num_failed_writes, e)
                self.give_back(dirty, dropped)
                return False
        self.num_writes += 1
        return True

    async def store_groups(self, groups: list[types_pb2.Group], stored: Callable[[], None]) -> None:
        """Append finished groups to the buffer in one transaction with what is pending; `stored()`
        runs once it committed, still under the lock, so no snapshot can journal them again.

        Raises `BufferFull` (nothing written: try again later), `StoreInDoubt` (a Redis error)."""
        async with self.lock:
            dirty, dropped, counters, put = self.take()
            try:
                await asyncio.to_thread(self.store.store_groups, groups, counters, put, sorted(dropped))
            except redis.exceptions.RedisError as e:  # BufferFull is not one: that write did not run
                self.give_back(dirty, dropped)
                raise StoreInDoubt(str(e)) from e
            except BaseException:
                self.give_back(dirty, dropped)
                raise
            stored()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
