"""`grpc.health.v1` for an asyncio server, with a shutdown that does not wait on watchers.

The stock asyncio servicer keeps every `Watch` stream open until the server cancels it, so
one prober watching a service holds its whole shutdown grace period (and logs a cancelled
handler). Here shutdown sets NOT_SERVING for good, every Watch stream sends it and then ends
normally, and `server.stop(grace)` only waits for real work. `Check` and `Watch` are open to
everyone (`rpc/security.py`): they say SERVING or not, nothing else.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, int] = {"": SERVING}
        self._changed = asyncio.Condition()
        self.shutting_down = False

    async def Check(self, request, context):  # noqa: N802 - gRPC method name
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):  # noqa: N802 - gRPC method name
        last = None

        def current() -> int:
            return self._status.get(request.service, UNKNOWN)

        while True:
            if current() != last:
                last = current()
                await context.write(health_pb2.HealthCheckResponse(status=last))
                continue  # the write awaited: a shutdown may have come meanwhile, look again
            if self.shutting_down:
                return  # NOT_SERVING was the last word: end the stream, do not hold the shutdown
            async with self._changed:
                await self._changed.wait_for(lambda seen=last: self.shutting_down or current() != seen)

    async def set(self, service: str, status: int) -> None:
        if self.shutting_down:
            return
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service, for good; watchers are told and their streams end."""
        async with self._changed:
            self.shutting_down = True
            for service in self._status:
                self._status[service] = NOT_SERVING
            self._changed.notify_all()
        await asyncio.sleep(0)  # let the watchers write it before the server starts stopping
