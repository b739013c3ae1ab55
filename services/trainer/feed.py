"""Exactly-once consumption of the replay buffer: which groups a step trains, and when Redis hears.

Delivery from the buffer is at least once; training is exactly once. The checkpoint is the truth
about what was trained and Redis follows it: entries trained since the last checkpoint stay
pending for this consumer and are committed (acked; reuse entries deleted and requeued, one
MULTI/EXEC) right after the next checkpoint is durably renamed (`checkpointer.py`). The
checkpoint holds the training count of every group id and the steps since the previous
checkpoint (`ledger.py`), so a trainer killed anywhere resumes (`--load`) without skipping or
repeating a trajectory. `Feed.recover()` runs before the first step:

- killed before the checkpoint: the entries of the lost steps are still pending; the resumed
  trainer re-reads them (XREADGROUP from id 0) and trains them first, in stream order: the
  same batches in the same order, so in deterministic CPU mode the loss curve is the same;
- killed after the checkpoint, before the commit: the checkpoint's last steps' entries are
  still pending; the resumed trainer makes that commit (it knows them), trains nothing twice;
- killed after the commit: nothing pending; it goes on.

The consumer name is fixed ("trainer-0", one trainer per run), so a restarted trainer finds its
own pending entries. Entries pending on any other consumer name for longer than
--lease-timeout are claimed (XAUTOCLAIM) at start: a trainer that was renamed, or whose
predecessor used another name, takes over what that one left.

`Feed.collect(count)` fills a step: replayed pending entries first, as a dead predecessor read
them; then fresh groups; reused ones (--max-reuse, oldest first) only to fill what fresh cannot
now. A group already trained as often as allowed is acknowledged at once and skipped; a reused
group past the staleness bound expires (deleted at the commit, never trained). When Redis comes
back after being unreachable, the pending list is read again (`_resync`): a restarted Redis may
have lost the last second of acknowledgements.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from slipstream.algorithms.staleness import StalenessBound
from slipstream.buffer.replay import ReplayBuffer, ReusedGroup
from slipstream.proto import types_pb2

from .ledger import Consumption, StepRecord
from .reconnect import Reconnect

log = logging.getLogger("slipstream.trainer")
CONSUMER = "trainer-0"
REDIS = "Redis (replay buffer)"


@dataclass
class StepGroups:
    """The groups of one step: fresh (stream ids to ack) and reused (to delete), plus expired reuses."""

    fresh: list[tuple[str, types_pb2.Group]] = field(default_factory=list)
    reused: list[ReusedGroup] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)  # reuse entries too stale to train: deleted
    duplicate_fresh: list[str] = field(default_factory=list)  # already trained: acked, skipped
    duplicate_reused: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.fresh) + len(self.reused)

    def trained(self) -> list[tuple[types_pb2.Group, int]]:
        """(group, times trained before this step), fresh first."""
        return [(g, 0) for _, g in self.fresh] + [(r.group, r.times_trained) for r in self.reused]


class Feed:
    """Where a step's groups come from (replayed pending entries first, then the buffer), and
    the commit that tells Redis what a checkpoint trained."""

    def __init__(
        self,
        buffer: ReplayBuffer,
        consumption: Consumption,
        reconnect: Reconnect,
        bound: StalenessBound,
        consumer: str = CONSUMER,
    ):
        self.buffer, self.consumption, self.reconnect = buffer, consumption, reconnect
        self.bound, self.consumer = bound, consumer
        self.replay_fresh: deque[tuple[str, types_pb2.Group]] = deque()
        self.replay_reuse: deque[ReusedGroup] = deque()
        self.redis_recoveries = 0  # Redis comebacks already resynced

    def _redis(self, fn, *args):
        """`fn(*args)` against Redis, retried while it is unreachable (`reconnect.py`)."""
        return self.reconnect.call(REDIS, lambda: fn(*args))

    # ---- before the first step -----------------------------------------------------------
    def recover(self, last_steps: list[StepRecord], lease_timeout: float) -> None:
        """Take over what a dead predecessor left pending, and finish its checkpoint's commit."""
        claimed = self._redis(self.buffer.claim_stale, self.consumer, int(lease_timeout * 1000))
        if claimed:
            log.info("claimed %d entries another consumer left pending", len(claimed))
        fresh, reused = self._read_pending()
        pending = {i for i, _ in fresh} | {r.entry_id for r in reused}
        last_ids = {i for r in last_steps for i in r.entry_ids}
        if last_ids & pending:  # the commit is one MULTI/EXEC: all of it happened, or none
            groups = {g.group_id: g for _, g in fresh} | {r.group.group_id: r.group for r in reused}
            self.commit(last_steps, groups)
            log.info("committed the %d steps of the checkpoint its predecessor did not", len(last_steps))
        if queued := self._replay(fresh, reused, skip=last_ids):
            log.info("%d pending entries from before the restart: trained first, in stream order", queued)

    def _read_pending(self) -> tuple[list[tuple[str, types_pb2.Group]], list[ReusedGroup]]:
        """Every entry pending on this consumer: (groups-stream entries, reuse-stream entries)."""
        fresh = self._redis(self.buffer.read_pending_groups, self.consumer)
        reused = self._redis(self.buffer.read_pending_reuse, self.consumer)
        return fresh, reused

    def _replay(
        self, fresh: list[tuple[str, types_pb2.Group]], reused: list[ReusedGroup], skip: set[str]
    ) -> int:
        """Queue pending entries (all but `skip`) to be trained before anything new; returns how many.
        `collect` acknowledges the duplicates among them."""
        fresh = [(i, g) for i, g in fresh if i not in skip]
        reused = [r for r in reused if r.entry_id not in skip]
        self.replay_fresh.extend(fresh)
        self.replay_reuse.extend(reused)
        return len(fresh) + len(reused)

    # ---- each step -----------------------------------------------------------------------
    def collect(self, count: int, version: int, stop: threading.Event | None = None) -> StepGroups:
        """`count` groups for weights of `version` (fewer only once `stop` is set)."""
        if self.reconnect.recoveries.get(REDIS, 0) != self.redis_recoveries:
            self._resync()
        picker = _Picker(self.consumption, self.bound, version)
        reuse = self.consumption.max_reuse > 1
        while len(picker.batch) < count and not (stop is not None and stop.is_set()):
            want = count - len(picker.batch)
            if self.replay_fresh or self.replay_reuse:  # what a dead predecessor read: as it read it
                picker.fresh(_pop(self.replay_fresh, want))
                picker.reused(_pop(self.replay_reuse, count - len(picker.batch)))
                continue
            picker.fresh(self._redis(self.buffer.read_groups, self.consumer, want, 0))
            if reuse and len(picker.batch) < count:
                picker.reused(self._redis(self.buffer.read_reuse, self.consumer, count - len(picker.batch)))
            if len(picker.batch) < count:
                picker.fresh(
                    self._redis(self.buffer.read_groups, self.consumer, count - len(picker.batch), 500)
                )
        self._skip_duplicates(picker.batch)
        return picker.batch

    def _skip_duplicates(self, batch: StepGroups) -> None:
        duplicates = len(batch.duplicate_fresh) + len(batch.duplicate_reused)
        if duplicates:
            log.warning("%d groups already trained as often as allowed: acknowledged and skipped", duplicates)
            self._redis(self.buffer.commit, batch.duplicate_fresh, batch.duplicate_reused)
            self.consumption.num_duplicates_skipped += duplicates

    def _resync(self) -> None:
        """After Redis came back: look at this consumer's pending list again.

        A restarted Redis (AOF, everysec) may have lost the last second of acknowledgements, and a
        read whose reply the connection drop swallowed left entries pending that this trainer never
        saw. Entries of steps not yet committed are expected there; of the rest, groups trained as
        often as allowed are acknowledged (duplicates), the others are trained like replayed ones.
        """
        self.redis_recoveries = self.reconnect.recoveries.get(REDIS, 0)
        known = {i for r in self.consumption.uncommitted for i in r.entry_ids}
        known |= {i for i, _ in self.replay_fresh} | {r.entry_id for r in self.replay_reuse}
        if queued := self._replay(*self._read_pending(), skip=known):
            log.info(
                "Redis came back: %d entries pending that this trainer had not trained or committed", queued
            )

    def requeue(self, batch: StepGroups, next_version: int) -> list[tuple[types_pb2.Group, int]]:
        """Groups to train again: fewer than --max-reuse trainings, within the bound of the next version."""
        return [
            (g, times + 1)
            for g, times in batch.trained()
            if times + 1 < self.consumption.max_reuse and self.bound.within(g.samples, next_version)
        ]

    def record(self, step: int, batch: StepGroups, next_version: int) -> list[tuple[types_pb2.Group, int]]:
        """Count step `step` as trained (committed at the next checkpoint); returns its requeues."""
        requeue = self.requeue(batch, next_version)
        trained = batch.trained()
        record = StepRecord(
            step=step,
            group_ids=[g.group_id for g, _ in trained],
            times_trained=[times + 1 for _, times in trained],
            fresh_ids=[entry_id for entry_id, _ in batch.fresh],
            reused_ids=[r.entry_id for r in batch.reused] + batch.expired,
            requeue=[(g.group_id, times) for g, times in requeue],
        )
        self.consumption.record(record, [g for g, _ in requeue])
        return requeue

    # ---- at a checkpoint -----------------------------------------------------------------
    def commit(self, records: list[StepRecord], groups: dict[str, types_pb2.Group]) -> None:
        """Tell Redis what a checkpoint trained: one MULTI/EXEC for all its steps."""
        if not records:
            return
        fresh = [i for r in records for i in r.fresh_ids]
        reused = [i for r in records for i in r.reused_ids]
        requeue = [(groups[gid], times) for r in records for gid, times in r.requeue]
        self.reconnect.call(
            REDIS,
            lambda: self.buffer.commit(fresh, reused, requeue, reuse_maxlen=self.bound.reuse_capacity()),
        )
        # Acknowledged entries are dead weight: drop everything behind the oldest entry the consumer
        # group still needs (pending or never delivered), so a long run's stream stays bounded and a
        # full Redis (maxmemory, noeviction) gets its room back.
        trimmed = self._redis(self.buffer.trim_acknowledged)
        log.debug("trimmed %d acknowledged entries from the groups stream", trimmed)


class _Picker:
    """One step's choice among offered entries: duplicates and expired reuses set aside, and a
    batch never holds a group twice (`planned` counts the trainings it adds)."""

    def __init__(self, consumption: Consumption, bound: StalenessBound, version: int):
        self.consumption, self.bound, self.version = consumption, bound, version
        self.batch = StepGroups()
        self.planned: dict[str, int] = {}

    def _plan(self, group_id: str) -> None:
        self.planned[group_id] = self.planned.get(group_id, 0) + 1

    def fresh(self, entries: list[tuple[str, types_pb2.Group]]) -> None:
        for entry_id, g in entries:
            if self.consumption.is_duplicate(g.group_id, 1, self.planned):
                self.batch.duplicate_fresh.append(entry_id)
            else:
                self._plan(g.group_id)
                self.batch.fresh.append((entry_id, g))

    def reused(self, entries: list[ReusedGroup]) -> None:
        for r in entries:
            if self.consumption.is_duplicate(r.group.group_id, r.times_trained + 1, self.planned):
                self.batch.duplicate_reused.append(r.entry_id)
            elif not self.bound.within(r.group.samples, self.version):
                self.batch.expired.append(r.entry_id)
            else:
                self._plan(r.group.group_id)
                self.batch.reused.append(r)


def _pop(queue: deque, n: int) -> list:
    return [queue.popleft() for _ in range(min(n, len(queue)))]
