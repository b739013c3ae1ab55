"""The coordinator's journal in Redis: its counters, its groups in assembly, and the atomic store.

The coordinator keeps its ledger in memory and journals it here, so a restarted coordinator
(or one whose Redis restarted) resumes where the journal says it was:

- `Keys.coordinator_state`, a hash of `CoordinatorCounters`: the prompt cursor's position, the
  policy version, the incarnation (bumped at every resume; lease epochs are issued above it), and
  the run's totals (stored, filtered, reward failures...).
- `Keys.assembly`, a hash with one field per group admitted and not yet stored: its
  `JournalGroup` (templates, finished results by index, admission version, deadline, parked
  partials).
- `finished_step` in the state hash: the run is over (the trainer reported its last step). A
  coordinator or trainer started again on this run id without --load refuses with `RunFinished`
  instead of resuming a run that has nothing left to do (what `docker compose up` twice did).

Only one write must be atomic, and is: `store_groups` appends finished groups to the groups
stream, removes them from the assembly hash and bumps `num_stored` in ONE MULTI/EXEC (and keeps
the groups' ids and uids in `Keys.last_stored`: the coordinator writes their dispatch-ledger lines
after the commit, so one killed in between writes them when it resumes). A crash
at any instant leaves a group either in the buffer or in assembly, never both (both would
train it twice) and never neither. Every other write may lag: a lost journal write only means
some work is generated again, under the same group id (`p<cursor index>`), which the trainer
deduplicates.

AOF gives Redis its own version of the same property: a restarted Redis holds a prefix of the
writes it acknowledged, so the journal and the buffer still agree with each other, only older.

Synchronous redis-py, like the replay buffer: the coordinator calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields

import redis
from google.protobuf.message import DecodeError

from slipstream.buffer.keys import Keys
from slipstream.buffer.replay import PAYLOAD, BufferFull
from slipstream.proto import coordinator_pb2, types_pb2

log = logging.getLogger(__name__)

STORED = "num_stored"  # only `store_groups` moves it, in the store's own transaction
FINISHED = "finished_step"  # set once the trainer reported its last step; never a counter


class RunFinished(RuntimeError):
    """This run id's journal says the run is over: a start without --load would resume nothing."""

    def __init__(self, run_id: str, step: int):
        super().__init__(f"run {run_id!r} finished at step {step}; use a new --run-id or --load to continue")
        self.run_id, self.step = run_id, step


@dataclass
class CoordinatorCounters:
    """Where the coordinator is in the run, and the run's totals (groups unless named otherwise).

    One record, field for field the journal's hash; the coordinator's pipeline keeps it current."""

    cursor: int = 0  # prompts handed out so far: the next group is p<cursor>
    version: int = 0  # the newest policy version the coordinator knows
    incarnation: int = 0  # bumped at every resume from the journal; lease epochs are issued above it
    num_stored: int = 0  # in the buffer
    num_filtered: int = 0  # dropped by the dynamic filter
    num_reward_failures: int = 0  # samples
    num_partials_recycled: int = 0  # samples
    num_stale_samples: int = 0  # samples stored with tokens older than the bound allows
    num_dead_lettered: int = 0  # samples whose reward failed --reward-max-failures times

    def journaled(self) -> dict[str, int]:
        """What a journal write sets (HSET): every counter but `num_stored`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != STORED}

    @classmethod
    def from_hash(cls, values: dict[str, int]) -> CoordinatorCounters:
        """From the journal's hash; missing counters read as 0, unknown ones are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class Snapshot:
    """What the journal holds for a run."""

    counters: CoordinatorCounters = field(default_factory=CoordinatorCounters)
    groups: list[coordinator_pb2.JournalGroup] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # group ids whose record did not decode
    finished_step: int | None = None  # the run is over at this step (`mark_finished`)
    last_stored: dict[str, list[str]] = field(default_factory=dict)  # the last store: group id -> uids


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class CoordinatorStore:
    def __init__(self, url: str, run_id: str):
        self.keys = Keys(run_id)
        # Timeouts: a Redis that died must fail a call, not hang the coordinator's writer thread.
        self.redis = redis.Redis.from_url(url, protocol=2, socket_timeout=5.0, socket_connect_timeout=2.0)

    def load(self) -> Snapshot | None:
        """The run's journal, or None when this run has none (a fresh start)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.coordinator_state)
            pipe.hgetall(self.keys.assembly)
            pipe.get(self.keys.last_stored)
            state, assembly, last_stored = pipe.execute()
        if not state:
            return None
        values = {_str(k): int(v) for k, v in state.items()}
        snap = Snapshot(
            CoordinatorCounters.from_hash(values),
            finished_step=values.get(FINISHED),
            last_stored=json.loads(last_stored) if last_stored else {},
        )
        for raw_id, data in sorted(assembly.items()):
            group = coordinator_pb2.JournalGroup()
            try:
                group.ParseFromString(data)
            except DecodeError:
                snap.corrupt.append(_str(raw_id))
                continue
            snap.groups.append(group)
        return snap

    def write(self, counters: CoordinatorCounters, put: dict[str, bytes], drop: list[str]) -> None:
        """One journal write: counters, the groups that changed, the groups that left without being stored."""
        with self.redis.pipeline(transaction=True) as pipe:
            self._queue_write(pipe, counters, put, drop)
            pipe.execute()

    def _queue_write(
        self, pipe, counters: CoordinatorCounters | None, put: dict[str, bytes], drop: list[str]
    ) -> None:
        if counters is not None:
            pipe.hset(self.keys.coordinator_state, mapping=counters.journaled())
        if put:
            pipe.hset(self.keys.assembly, mapping=put)
        if drop:
            pipe.hdel(self.keys.assembly, *drop)

    def store_groups(
        self,
        groups: list[types_pb2.Group],
        counters: CoordinatorCounters | None = None,
        put: dict[str, bytes] | None = None,
        drop: list[str] = (),
    ) -> list[str]:
        """Append finished groups to the buffer in order and take them out of assembly, atomically,
        with whatever journal write was pending (`write`'s arguments); their entry ids."""
        for group in groups:
            if not group.samples:
                raise ValueError(f"group {group.group_id!r} has no samples")
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                self._queue_write(pipe, counters, put or {}, drop)
                stored = {g.group_id: [s.uid for s in g.samples] for g in groups}
                pipe.set(self.keys.last_stored, json.dumps(stored))
                for group in groups:
                    pipe.xadd(self.keys.groups, {PAYLOAD: group.SerializeToString()})
                pipe.hdel(self.keys.assembly, *(g.group_id for g in groups))
                pipe.hincrby(self.keys.coordinator_state, STORED, len(groups))
                replies = pipe.execute()
        except (redis.exceptions.OutOfMemoryError, redis.exceptions.ExecAbortError) as e:
            # noeviction refuses a queued XADD and EXEC aborts the whole transaction: nothing written.
            ids = ("group " if len(groups) == 1 else "groups ") + ", ".join(g.group_id for g in groups)
            raise BufferFull(f"Redis is full (maxmemory, noeviction): {ids} not stored: {e}") from None
        return [_str(entry_id) for entry_id in replies[len(replies) - 2 - len(groups) : -2]]

    def mark_finished(self, step: int) -> None:
        """The trainer reported its last step: the run is over (read back by `finished_step`)."""
        self.redis.hset(self.keys.coordinator_state, FINISHED, step)

    def finished_step(self) -> int | None:
        """The step this run finished at, or None while it is not finished (or never started)."""
        value = self.redis.hget(self.keys.coordinator_state, FINISHED)
        return None if value is None else int(value)

    def server_run_id(self) -> str:
        """The Redis server's run id (it changes when the server restarts), once it has loaded its data."""
        info = self.redis.info()
        if int(info.get("loading", 0)):  # replaying its AOF: data commands would answer LOADING
            raise redis.exceptions.BusyLoadingError("Redis is loading its data")
        return _str(info["run_id"])

    def close(self) -> None:
        self.redis.close()
