"""The replay buffer: scored groups on a Redis stream, consumed by trainers through a consumer group.

Life of a group: the coordinator `put_group`s it (XADD, protobuf bytes); a trainer
`read_groups` it (XREADGROUP `>`: each entry goes to exactly one consumer of the group and sits
in that consumer's pending list); the trainer trains on it and `ack`s it only once the step that
used it is committed (checkpointed), so a trainer that dies mid-step loses nothing: its pending
entries are `claim_stale`d (XAUTOCLAIM) by a live consumer once idle long enough, or re-read
by its successor under the same consumer name (`read_pending_groups`: XREADGROUP from id 0,
what the trainer does first when it starts). Acknowledged
entries are dead weight; `trim_acknowledged` drops everything strictly behind the oldest entry
the group still needs.

Reuse (`--max-reuse K`): after a step commits, `commit` acknowledges what it trained and, in
the same MULTI/EXEC, re-appends the groups that may be trained again to the reuse stream with
their training count (`n`). Trainers take reuse entries (`read_reuse`, oldest first) only to
complete a batch that fresh groups cannot fill right now; a reuse entry is deleted when it is
committed, so each group is trained at most K times and every training is accounted for once.

Partial trajectories (aborted on a weight update, to be continued) wait in a second stream,
`partials` (`partials.py`), which pops them atomically so two takers never get the same one.

A payload that cannot be decoded is data, not a reason to crash a trainer: it is copied to the
dead-letter stream with the reason and acknowledged (or removed) in the same MULTI/EXEC, so it
is neither lost nor read twice.

Everything is synchronous `redis.Redis`: the trainer calls it directly, the coordinator through
`asyncio.to_thread`. One instance is safe to share between threads (redis-py pools connections).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from slipstream.buffer.keys import DEFAULT_CONSUMER_GROUP, Keys
from slipstream.buffer.partials import Partials
from slipstream.buffer.payloads import PAYLOAD, CorruptPayload, as_str, decode_group
from slipstream.proto import types_pb2

log = logging.getLogger(__name__)

TIMES_TRAINED = b"n"  # on reuse-stream entries: how many times the group was trained already
DEAD_LETTER_MAXLEN = 10_000  # approximate; dead letters are for inspection, not an archive


class BufferFull(RuntimeError):
    """Redis refused a write: it is at `maxmemory` with `noeviction`. Nothing was written or evicted;
    the writer should wait for trainers to acknowledge (and trim) and try again: backpressure."""


def _next_id(entry_id: str) -> str:
    """The smallest stream id greater than `entry_id`."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


@dataclass
class ReusedGroup:
    """A group from the reuse stream: trained `times_trained` times already."""

    entry_id: str
    group: types_pb2.Group
    times_trained: int


class ReplayBuffer:
    """Groups stream + partials stream (`.partials`) + dead letters of one run, over one Redis."""

    def __init__(self, url: str, run_id: str, consumer_group: str = DEFAULT_CONSUMER_GROUP):
        self.keys = Keys(run_id)
        self.consumer_group = consumer_group
        # RESP2 pinned: the reply shapes parsed below do not depend on the server's default.
        self.redis = redis.Redis.from_url(url, protocol=2, health_check_interval=30)
        self._group_ready = False
        self.partials = Partials(self.redis, self.keys, self._queue_dead_letter)

    # ---- groups --------------------------------------------------------------------------
    def put_group(self, group: types_pb2.Group) -> str:
        """Append a scored group; returns its stream entry id."""
        if not group.samples:
            raise ValueError(f"group {group.group_id!r} has no samples")
        try:
            return as_str(self.redis.xadd(self.keys.groups, {PAYLOAD: group.SerializeToString()}))
        except redis.exceptions.OutOfMemoryError as e:
            raise BufferFull(
                f"Redis is full (maxmemory, noeviction): group {group.group_id} not stored: {e}"
            ) from None

    def ensure_consumer_group(self) -> None:
        """Create the consumer group (and the stream) if missing; it starts at the stream's start."""
        if self._group_ready:
            return
        for stream in (self.keys.groups, self.keys.reuse):
            try:
                self.redis.xgroup_create(stream, self.consumer_group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._group_ready = True

    def read_groups(
        self, consumer: str, count: int, block_ms: int = 1000
    ) -> list[tuple[str, types_pb2.Group]]:
        """Up to `count` never-delivered groups for `consumer`, waiting up to `block_ms` (0 = don't wait).

        Each returned entry is pending for `consumer` until `ack`ed or claimed by another one.
        """
        self.ensure_consumer_group()
        try:
            reply = self._xreadgroup(consumer, count, block_ms)
        except redis.exceptions.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # The stream was deleted under us (a reset run); recreate and read again.
            self._group_ready = False
            self.ensure_consumer_group()
            reply = self._xreadgroup(consumer, count, block_ms)
        entries = reply[0][1] if reply else []
        return self._decode_entries(entries)

    def _xreadgroup(self, consumer: str, count: int, block_ms: int):
        return self.redis.xreadgroup(
            self.consumer_group, consumer, {self.keys.groups: ">"}, count=count,
            block=block_ms if block_ms > 0 else None,
        )  # fmt: skip

    def _decode_entries(self, entries) -> list[tuple[str, types_pb2.Group]]:
        good: list[tuple[str, types_pb2.Group]] = []
        for raw_id, fields in entries:
            entry_id = as_str(raw_id)
            if fields is None:  # deleted while pending (RESP2 gives a nil body)
                continue
            try:
                good.append((entry_id, decode_group(fields)))
            except CorruptPayload as e:
                self._dead_letter_group_entry(entry_id, fields, str(e))
        return good

    def _dead_letter_group_entry(
        self, entry_id: str, fields: dict[bytes, bytes], reason: str, stream: str | None = None
    ) -> None:
        stream = stream or self.keys.groups
        log.warning(
            "%s entry %s is corrupt (%s): moved to %s", stream, entry_id, reason, self.keys.dead_letter
        )
        payload = fields.get(PAYLOAD, b"")
        with self.redis.pipeline(transaction=True) as pipe:
            self._queue_dead_letter(pipe, payload, reason, stream, entry_id)
            pipe.xack(stream, self.consumer_group, entry_id)
            if stream == self.keys.reuse:
                pipe.xdel(stream, entry_id)
            pipe.execute()

    def ack(self, entry_ids: list[str]) -> int:
        """Acknowledge entries whose training step is committed; returns how many were pending."""
        if not entry_ids:
            return 0
        return int(self.redis.xack(self.keys.groups, self.consumer_group, *entry_ids))

    # ---- reuse ---------------------------------------------------------------------------
    def read_reuse(self, consumer: str, count: int) -> list[ReusedGroup]:
        """Up to `count` requeued groups, oldest first, without waiting; pending until `commit`."""
        if count <= 0:
            return []
        self.ensure_consumer_group()
        reply = self.redis.xreadgroup(self.consumer_group, consumer, {self.keys.reuse: ">"}, count=count)
        return self._decode_reuse(reply[0][1] if reply else [])

    def _decode_reuse(self, entries) -> list[ReusedGroup]:
        out: list[ReusedGroup] = []
        for raw_id, fields in entries:
            entry_id = as_str(raw_id)
            if fields is None:
                continue
            try:
                group = decode_group(fields)
                times = int(fields.get(TIMES_TRAINED, b"1"))
            except (CorruptPayload, ValueError) as e:
                self._dead_letter_group_entry(entry_id, fields, str(e), self.keys.reuse)
                continue
            out.append(ReusedGroup(entry_id, group, times))
        return out

    def commit(
        self,
        fresh_ids: list[str],
        reused_ids: list[str] = (),
        requeue: list[tuple[types_pb2.Group, int]] = (),
        reuse_maxlen: int | None = None,
    ) -> None:
        """One MULTI/EXEC after a checkpoint: ack the fresh groups its steps trained, delete the reused
        ones, and append `requeue` (group, times trained so far) to the reuse stream.

        `reuse_maxlen` caps the reuse stream (oldest entries go first): when fresh groups keep
        up, reuse entries are never read, and past the staleness bound they are useless anyway.
        """
        with self.redis.pipeline(transaction=True) as pipe:
            if fresh_ids:
                pipe.xack(self.keys.groups, self.consumer_group, *fresh_ids)
            if reused_ids:
                pipe.xack(self.keys.reuse, self.consumer_group, *reused_ids)
                pipe.xdel(self.keys.reuse, *reused_ids)
            for group, times in requeue:
                fields = {PAYLOAD: group.SerializeToString(), TIMES_TRAINED: str(times)}
                pipe.xadd(self.keys.reuse, fields, maxlen=reuse_maxlen, approximate=False)
            pipe.execute()

    def num_reuse(self) -> int:
        """Groups waiting in the reuse stream (read or not)."""
        return int(self.redis.xlen(self.keys.reuse))

    def claim_stale(
        self, consumer: str, min_idle_ms: int, count: int = 100
    ) -> list[tuple[str, types_pb2.Group]]:
        """Take over up to `count` entries pending on any consumer for at least `min_idle_ms`."""
        self.ensure_consumer_group()
        claimed: list[tuple[str, types_pb2.Group]] = []
        cursor = "0-0"
        while len(claimed) < count:
            reply = self.redis.xautoclaim(
                self.keys.groups, self.consumer_group, consumer, min_idle_ms,
                start_id=cursor, count=count - len(claimed),
            )  # fmt: skip
            cursor = as_str(reply[0])
            claimed += self._decode_entries(reply[1])
            if cursor == "0-0":  # the whole pending list was scanned
                break
        return claimed

    def read_pending_groups(self, consumer: str) -> list[tuple[str, types_pb2.Group]]:
        """Every groups-stream entry pending on `consumer` (delivered, not acknowledged), oldest first.

        A restarted trainer reads these (XREADGROUP from id 0) before anything new: they are the
        entries its predecessor read but had not committed when it died.
        """
        return self._decode_entries(self._pending(self.keys.groups, consumer))

    def read_pending_reuse(self, consumer: str) -> list[ReusedGroup]:
        """Every reuse-stream entry pending on `consumer`, oldest first (see `read_pending_groups`)."""
        return self._decode_reuse(self._pending(self.keys.reuse, consumer))

    def _pending(self, stream: str, consumer: str) -> list:
        self.ensure_consumer_group()
        out, cursor = [], "0"
        while True:
            reply = self.redis.xreadgroup(self.consumer_group, consumer, {stream: cursor}, count=1000)
            entries = reply[0][1] if reply else []
            if not entries:
                return out
            gone = [as_str(raw_id) for raw_id, fields in entries if fields is None]
            if gone:  # deleted while pending: nothing left to train, so nothing left to wait for
                self.redis.xack(stream, self.consumer_group, *gone)
            out += [(raw_id, fields) for raw_id, fields in entries if fields is not None]
            cursor = as_str(entries[-1][0])

    def num_groups(self) -> int:
        """Entries in the groups stream (read or not; until trimmed)."""
        return int(self.redis.xlen(self.keys.groups))

    def num_pending(self) -> int:
        """Entries delivered to some consumer and not acknowledged yet."""
        try:
            return int(self.redis.xpending(self.keys.groups, self.consumer_group)["pending"])
        except redis.exceptions.ResponseError as e:
            if "NOGROUP" in str(e):
                return 0
            raise

    def trim_acknowledged(self) -> int:
        """Delete entries strictly behind the oldest one the consumer group still needs; returns how many.

        Needed = pending (delivered, unacked) or never delivered. Both facts are read in one
        MULTI/EXEC so they describe the same instant; acknowledgements only move forward, so
        trimming on that snapshot afterwards is safe even while consumers keep working.
        """
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xinfo_groups(self.keys.groups)
            pipe.xpending(self.keys.groups, self.consumer_group)
            try:
                groups_info, pending = pipe.execute()
            except redis.exceptions.ResponseError as e:
                if "no such key" in str(e) or "NOGROUP" in str(e):
                    return 0
                raise
        info = next((g for g in groups_info if as_str(g["name"]) == self.consumer_group), None)
        if info is None:
            return 0
        if pending["pending"]:
            min_id = as_str(pending["min"])
        else:
            last = as_str(info["last-delivered-id"])
            if _id_key(last) == (0, 0):
                return 0
            min_id = _next_id(last)
        return int(self.redis.xtrim(self.keys.groups, minid=min_id, approximate=False))

    # ---- dead letters --------------------------------------------------------------------
    def dead_letter(self, payload: bytes, reason: str, source: str = "", entry_id: str = "") -> str:
        """Keep an unusable payload with why, where from; returns its dead-letter entry id."""
        return as_str(self._queue_dead_letter(self.redis, payload, reason, source, entry_id))

    def _queue_dead_letter(self, client, payload: bytes, reason: str, source: str, entry_id: str):
        fields = {PAYLOAD: payload, b"reason": reason, b"source": source, b"entry_id": entry_id}
        return client.xadd(self.keys.dead_letter, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)

    def dead_letters(self, count: int = 100) -> list[tuple[str, dict[str, bytes | str]]]:
        """The oldest dead letters: (id, {payload, reason, source, entry_id})."""
        out = []
        for raw_id, fields in self.redis.xrange(self.keys.dead_letter, count=count):
            row: dict[str, bytes | str] = {k.decode(): v.decode() for k, v in fields.items() if k != PAYLOAD}
            row["payload"] = fields.get(PAYLOAD, b"")
            out.append((as_str(raw_id), row))
        return out

    # ---- the whole run -------------------------------------------------------------------
    def clear_run(self) -> int:
        """Delete every key of this run (buffer, coordinator journal, trainer state); returns how many.

        For a fresh start on a Redis that may hold an earlier run of the same id; a restarted
        service or a resumed run (`--load`) must never call it."""
        keys = list(self.redis.scan_iter(match=self.keys.pattern, count=1000))
        return int(self.redis.delete(*keys)) if keys else 0

    # ---- connection ----------------------------------------------------------------------
    def ping(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
