"""Partial trajectories of one run: samples aborted mid-generation (a weight update, a server
gone) that wait on their own stream until the coordinator re-dispatches them to be continued.

`take` pops the oldest atomically (XRANGE and XDEL in one WATCHed transaction), so two takers
never get the same one; an entry that does not decode goes to the run's dead letters in the same
transaction. The coordinator is the only writer and taker (`services/coordinator/server.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis

from slipstream.buffer.keys import Keys
from slipstream.buffer.payloads import PAYLOAD, CorruptPayload, as_str, decode_sample
from slipstream.proto import types_pb2

log = logging.getLogger(__name__)

# (client or pipeline, payload, reason, source key, entry id): queue a dead letter (`ReplayBuffer`'s)
DeadLetter = Callable[[Any, bytes, str, str, str], Any]


class Partials:
    """The partial-trajectory stream of one run (`ReplayBuffer.partials`)."""

    def __init__(self, client: redis.Redis, keys: Keys, dead_letter: DeadLetter) -> None:
        self._redis = client
        self._keys = keys
        self._dead_letter = dead_letter

    def put(self, sample: types_pb2.Sample) -> str:
        """Park a partial trajectory until the coordinator re-dispatches it."""
        return as_str(self._redis.xadd(self._keys.partials, {PAYLOAD: sample.SerializeToString()}))

    def take(self, count: int) -> list[types_pb2.Sample]:
        """Remove and return up to `count` of the oldest partials; corrupt ones go to dead letters."""
        if count <= 0:
            return []
        taken: list[types_pb2.Sample] = []

        def take(pipe: redis.client.Pipeline) -> None:
            taken.clear()  # the transaction reruns if another taker changed the stream meanwhile
            entries = pipe.xrange(self._keys.partials, count=count)
            if not entries:
                return
            pipe.multi()
            for raw_id, fields in entries:
                entry_id = as_str(raw_id)
                try:
                    taken.append(decode_sample(fields))
                except CorruptPayload as e:
                    log.warning("partials entry %s is corrupt (%s): moved to dead letters", entry_id, e)
                    self._dead_letter(pipe, fields.get(PAYLOAD, b""), str(e), self._keys.partials, entry_id)
            pipe.xdel(self._keys.partials, *[as_str(raw_id) for raw_id, _ in entries])

        self._redis.transaction(take, self._keys.partials)
        return taken

    def count(self) -> int:
        return int(self._redis.xlen(self._keys.partials))
