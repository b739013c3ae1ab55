"""A stream's outbox, written as few messages as its bursts allow.

The `Attach` stream carries one work item and one result per sample. Each message costs every
process it crosses a fixed price (a gRPC write and read, an event-loop wake-up, a protobuf
envelope), and on a 2-core box with 512 samples a step that price was most of what the
coordinator and the rollout servers spent beyond the engine (issue 14, docs/benchmarks.md).
Items are produced in bursts (one dispatch places a whole group; one engine step finishes many
samples), so the writer sends what is already queued when it wakes as one batch message
(`WorkBatch`, `ResultBatch`): the rooms that produce and consume items still speak in single
items, and a batch is read exactly as that many single messages in order.

Only consecutive items merge (a command of another kind keeps its place), a batch stays under
`MAX_BATCH_BYTES`, and a lone item goes as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

MAX_BATCH_BYTES = 8 * 1024 * 1024  # well under the channels' 64 MiB message limit

_NOTHING = object()


async def coalesced(outbox: asyncio.Queue, single: str, batch: str) -> AsyncIterator[Any]:
    """The messages put into `outbox` until `None`, with runs of queued `single` messages (the
    oneof `kind` name) merged into one message whose `batch` field holds them (its one repeated
    field)."""
    held: Any = _NOTHING  # taken from the queue, not sent yet: it ended the previous run
    while True:
        msg = await outbox.get() if held is _NOTHING else held
        held = _NOTHING
        if msg is None:
            return
        if msg.WhichOneof("kind") != single:
            yield msg
            continue
        run, size = [msg], msg.ByteSize()
        while not outbox.empty():
            nxt = outbox.get_nowait()
            if nxt is None or nxt.WhichOneof("kind") != single or size + nxt.ByteSize() > MAX_BATCH_BYTES:
                held = nxt
                break
            run.append(nxt)
            size += nxt.ByteSize()
        if len(run) == 1:
            yield msg
            continue
        out = type(msg)()
        items = getattr(out, batch)
        repeated = getattr(items, items.DESCRIPTOR.fields[0].name)
        repeated.extend(getattr(m, single) for m in run)
        yield out


def items(msg: Any, single: str, batch: str) -> list[Any]:
    """What a message of kind `single` or `batch` carries, in order."""
    if msg.WhichOneof("kind") == single:
        return [getattr(msg, single)]
    items = getattr(msg, batch)
    return list(getattr(items, items.DESCRIPTOR.fields[0].name))
