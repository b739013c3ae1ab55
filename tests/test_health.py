"""The asyncio health servicer: a Watch stream always ends with NOT_SERVING at shutdown."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from slipstream.rpc.health import NOT_SERVING, SERVING, HealthServicer


class _Stream:
    """The part of a grpc.aio servicer context that Watch uses: `write`, which awaits its send."""

    def __init__(self, on_write=None) -> None:
        self.sent: list[int] = []
        self.on_write = on_write

    async def write(self, msg: health_pb2.HealthCheckResponse) -> None:
        self.sent.append(msg.status)
        if self.on_write is not None:
            await self.on_write(len(self.sent))


def test_shutdown_during_a_watch_write_still_sends_not_serving():
    # The race the SIGTERM chaos test hit: the shutdown lands while the first SERVING is still
    # being written; the stream must still say NOT_SERVING before it ends.
    async def scenario():
        health = HealthServicer()

        async def shutdown_on_first(n: int) -> None:
            if n == 1:
                await health.enter_graceful_shutdown()

        stream = _Stream(shutdown_on_first)
        await asyncio.wait_for(health.Watch(health_pb2.HealthCheckRequest(), stream), 5)
        assert stream.sent == [SERVING, NOT_SERVING]

    asyncio.run(scenario())


def test_watch_reports_each_change_then_ends_at_shutdown():
    async def scenario():
        health = HealthServicer()
        stream = _Stream()
        watch = asyncio.ensure_future(health.Watch(health_pb2.HealthCheckRequest(), stream))
        await asyncio.sleep(0.05)
        await health.set("", NOT_SERVING)
        await asyncio.sleep(0.05)
        await health.set("", SERVING)
        await asyncio.sleep(0.05)
        assert not watch.done()
        await health.enter_graceful_shutdown()
        await asyncio.wait_for(watch, 5)
        assert stream.sent == [SERVING, NOT_SERVING, SERVING, NOT_SERVING]

    asyncio.run(scenario())
