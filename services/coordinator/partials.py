"""Partial trajectories: samples aborted mid-generation, parked in Redis, continued later.

A sample comes back ABORTED when its server swapped weights with `--pause-generation-mode
abort`, or when over-sampling filled the batch and the pipeline aborted what still ran. The
`Ledger` parks it (no lease, not queued, its tokens so far kept as the sample's template), and
`Partials` writes it to the buffer's partial stream. Before any new prompt is admitted (the
pipeline checks `ledger.parked`), the parked partials are taken back from the stream and queued
first, to be continued under the newest weights from where they stopped.

Nothing is lost on the way: a partial Redis refuses to take is continued from memory, and after
a restore (`take_all`) a parked partial the stream lost (Redis restarted) is continued from the
journal's copy. A partial the stream holds that no group waits for is dropped, with a line.

What to call is given: `park` and `take` (the buffer), `mark` (the journal), `spawn` (the
pipeline's task set, so a replaced pipeline's takes are cancelled with it) and `then` (the
pipeline's dispatch, once something changed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine

from slipstream.proto import types_pb2
from slipstream.services.coordinator.groups import Ledger

log = logging.getLogger(__name__)


class Partials:
    def __init__(
        self,
        ledger: Ledger,
        park: Callable[[types_pb2.Sample], Awaitable[None]],
        take: Callable[[int | None], Awaitable[list[types_pb2.Sample]]],
        mark: Callable[[str], None],
        spawn: Callable[[Coroutine], asyncio.Task],
        then: Callable[[], None],
    ):
        self.ledger = ledger
        self._park_in_stream, self._take, self._mark, self._spawn, self._then = park, take, mark, spawn, then
        self._num_parking = 0  # partials being written to the partial stream
        self._taking = False  # a take is under way

    def park(self, sample: types_pb2.Sample) -> None:
        """Write a parked partial to the partial stream (it stays parked until taken back)."""
        self._spawn(self._park(sample))

    def recycle(self) -> None:
        """Take back the parked partials already in the stream, unless a take is under way."""
        in_stream = len(self.ledger.parked) - self._num_parking
        if in_stream > 0 and not self._taking:
            self._taking = True
            self._spawn(self._take_back(in_stream))

    def take_all(self) -> None:
        """After a restore: take every partial back; one the stream lost comes from the journal."""
        if self.ledger.parked:
            self._taking = True
            self._spawn(self._take_back(None))

    async def _park(self, sample: types_pb2.Sample) -> None:
        self._num_parking += 1
        try:
            await self._park_in_stream(sample)
        except Exception as e:  # noqa: BLE001 - Redis refused it: continue it from memory, nothing lost
            log.warning("could not park partial %s (%s); continuing it from memory", sample.uid, e)
            self.ledger.resume(sample)
        finally:
            self._num_parking -= 1
        self._then()

    async def _take_back(self, count: int | None) -> None:
        try:
            partials = await self._take(count)
        except Exception as e:  # noqa: BLE001 - Redis refused: they stay in the stream for the next try
            log.warning("could not take partials back: %s", e)
            return
        finally:
            self._taking = False
        for partial in partials:
            if self.ledger.resume(partial):
                self._mark(partial.uid.rsplit("/", 1)[0])
            else:
                log.warning("partial %s belongs to no group in flight; dropped", partial.uid)
        if count is None:
            for uid in sorted(self.ledger.parked):  # the stream lost it (Redis restart): the journal has it
                log.warning("partial %s is not in the partial stream; continuing it from the journal", uid)
                self.ledger.resume(self.ledger.sample_of(uid))
        self._then()
