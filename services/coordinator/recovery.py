"""Recovery: the pipeline built from the Redis journal, at start and whenever Redis loses our state.

The pipeline in memory is the truth while the coordinator runs; Redis holds its journal
(journal.py, buffer/coordinator_store.py). `Recovery` owns the pipeline now in charge and
builds it from a journal `Snapshot`:

- at start: a run with a journal is resumed (a restarted coordinator), one without starts fresh;
- after Redis restarted (a new run_id) or a Redis write failed: Redis holds a consistent prefix of
  what was written (AOF), buffer and journal alike, and the coordinator goes back to it.

Either way it is the same step, `_build`: a new incarnation, a new journal, a new `Pipeline` that
takes the snapshot's cursor, counters and every group in assembly (finished results kept,
unfinished samples queued under lease epochs above any issued before, parked partials taken back
from the partial stream). On a reload the old pipeline's leases are aborted on their streams, it
is dropped, and its tasks are cancelled while the journal lock is held, so nothing it started can
land after the new one took over; results of its leases come back under old epochs and are
refused. Whatever was admitted after the journal's cursor is admitted again, under the same
group ids. No field is reset by hand: there is nothing to forget.

The new incarnation is written before anything goes out under it. If Redis stays unreachable past
`--reconnect-timeout`, the coordinator stops (`RedisLost`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import redis

from slipstream.buffer.coordinator_store import CoordinatorCounters, CoordinatorStore, Snapshot
from slipstream.services.coordinator.journal import Journal, from_record
from slipstream.services.coordinator.pipeline import Pipeline
from slipstream.services.coordinator.weights_relay import WeightRelay

log = logging.getLogger(__name__)

REDIS_CHECK_S = 1.0  # how often the coordinator asks Redis whether it restarted

NewPipeline = Callable[[CoordinatorCounters, Journal], Pipeline]


class RedisLost(ConnectionError):
    """Redis stayed unreachable past --reconnect-timeout: the coordinator stops with this line."""


class Recovery:
    def __init__(
        self, store: CoordinatorStore, relay: WeightRelay, new: NewPipeline, reconnect_timeout: float
    ):
        self.store = store
        self.relay = relay
        self.new = new  # builds a pipeline over the given counters and journal
        self.reconnect_timeout = reconnect_timeout
        # Every Redis write of the coordinator's state (journal rounds, stores, reloads) takes this
        # lock, so they never interleave.
        self.lock = asyncio.Lock()
        self.pipeline: Pipeline | None = None
        self.journal: Journal | None = None
        self.incarnation = 0  # bumped at each resume from the journal
        self.redis_run_id = ""  # the Redis server's run_id: a new one means Redis restarted
        self._resync = asyncio.Event()  # a Redis write failed: reload from the journal once it answers
        self._watcher: asyncio.Task | None = None
        self.fatal = ""  # why the coordinator must stop (Redis lost for good)
        self.on_fatal: Callable[[], None] = lambda: None

    def resync(self) -> None:
        self._resync.set()

    async def start(self, snap: Snapshot | None) -> None:
        """The first pipeline: this run's journal resumed, or a fresh start; then watch Redis."""
        if snap is not None:  # a restarted coordinator
            self.incarnation = snap.counters.incarnation + 1
        self._build(snap or Snapshot(), resumed=snap is not None)
        await self._begin()
        self.redis_run_id = await asyncio.to_thread(self.store.server_run_id)
        self._watcher = asyncio.create_task(self._watch())

    def _build(self, snap: Snapshot, resumed: bool = True) -> None:
        """A new journal and pipeline holding `snap`'s state, in charge from now on."""
        self.relay.known_version = max(self.relay.known_version, snap.counters.version)
        journal = Journal(self.store, lambda dirty: pipeline.snapshot(dirty), self.lock)
        pipeline = self.new(replace(snap.counters, incarnation=self.incarnation), journal)
        for group_id in snap.corrupt:
            log.error("journal record of group %s does not decode; it is lost", group_id)
        for record in snap.groups:
            pipeline.restore(from_record(record), set(record.parked))
        if written := pipeline.events.complete("stored", snap.last_stored):
            log.info(
                "dispatch ledger: wrote the stored lines of %s (stored before the stop, not yet logged)",
                ", ".join(written),
            )
        pipeline.start()
        self.pipeline, self.journal = pipeline, journal
        if resumed:
            log.info(
                "resumed (incarnation %d): cursor %d, version %d%s, %d stored, %d groups in assembly "
                "(%d samples to generate, %d partials parked)",
                self.incarnation,
                pipeline.cursor.position,
                self.relay.version,
                "" if self.relay.held else " (weights not held: waiting for the trainer's push)",
                pipeline.counters.num_stored,
                len(snap.groups),
                pipeline.ledger.num_queued,
                len(pipeline.ledger.parked),
            )

    async def _begin(self) -> None:
        # Written before anything goes out: the incarnation must be durable before any epoch above it.
        counters, _ = self.pipeline.snapshot(set())
        await asyncio.to_thread(self.store.write, counters, {}, [])
        self.journal.start()

    async def reload(self, reason: str) -> None:
        """Put a pipeline built from the journal in charge of the old one (Redis restarted or a
        write failed)."""
        run_id = await self._wait_for_redis(reason)
        async with self.lock:
            snap = await asyncio.to_thread(self.store.load) or Snapshot()
            old, old_journal = self.pipeline, self.journal
            old.abort_all()  # before the new pipeline can hand the same samples out again
            self.incarnation = max(self.incarnation, snap.counters.incarnation) + 1
            self._build(snap)
            await old.close()
            await old_journal.close()
            await self._begin()
            self.redis_run_id = run_id
            self._resync.clear()
        self.pipeline.dispatch()

    async def _wait_for_redis(self, reason: str) -> str:
        """Redis's run_id once it answers again; `RedisLost` after --reconnect-timeout."""
        limit = self.reconnect_timeout
        log.warning("Redis %s; waiting up to %.0fs for it, then reloading from the journal", reason, limit)
        t0, backoff = time.monotonic(), 0.1
        while True:
            try:
                return await asyncio.to_thread(self.store.server_run_id)
            except redis.exceptions.RedisError as e:
                if time.monotonic() - t0 > limit:
                    raise RedisLost(
                        f"Redis unreachable for {limit:.0f}s (--reconnect-timeout): {e}"
                    ) from None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _watch(self) -> None:
        """Every second: is Redis the same server as before? If not (or a write failed), reload."""
        while True:
            try:
                await asyncio.wait_for(self._resync.wait(), REDIS_CHECK_S)
                reason = "write failed"
            except TimeoutError:
                try:
                    run_id = await asyncio.to_thread(self.store.server_run_id)
                except redis.exceptions.RedisError as e:
                    reason = f"unreachable ({e})"
                else:
                    if run_id == self.redis_run_id:
                        continue
                    reason = "restarted (new run_id)"
            try:
                t0 = time.monotonic()
                await self.reload(reason)
                log.info("reloaded from the journal in %.2fs", time.monotonic() - t0)
            except RedisLost as e:
                self.fatal = str(e)
                log.error("%s", e)
                self.on_fatal()
                return
            except redis.exceptions.RedisError as e:  # it went away again mid-reload: start over
                log.warning("reload from the journal failed (%s); retrying", e)
                self._resync.set()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.pipeline.close()
        await self.journal.close()
        await self.journal.flush()  # what changed last (best effort: a crash would lose it too)
