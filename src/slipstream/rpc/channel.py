"""Client channels: same options everywhere, waiting for a peer to become healthy."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slipstream.rpc.server import KEEPALIVE_OPTIONS, MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *KEEPALIVE_OPTIONS,
]


def aio_channel(addr: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)


def sync_channel(addr: str) -> grpc.Channel:
    return grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)


async def wait_healthy(channel: grpc.aio.Channel, timeout: float = 30.0, what: str = "service") -> None:
    """Poll grpc.health.v1 until SERVING; raise TimeoutError naming `what` otherwise."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last: Exception | str = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        except grpc.aio.AioRpcError as e:
            last = e.details() or e.code().name
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{what} not healthy after {timeout:.0f}s ({last})")


def wait_healthy_sync(channel: grpc.Channel, timeout: float = 30.0, what: str = "service") -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last: Exception | str = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        except grpc.RpcError as e:
            last = e.details() or e.code().name  # type: ignore[attr-defined]
        time.sleep(0.2)
    raise TimeoutError(f"{what} not healthy after {timeout:.0f}s ({last})")
