"""Client channels: same options everywhere, waiting for a peer to become healthy.

Every channel gets the message-size limits and keepalive of the servers (`rpc/server.py`), the
retry policy of `rpc/retry.py` (idempotent calls only, on UNAVAILABLE only), and the process's
security settings (`rpc/security.py`): TLS credentials when configured, and an interceptor that
adds the token and gives any call made without a deadline the default one (`--rpc-timeout`;
the long-lived `Attach` stream excepted).
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slipstream.rpc import retry, security
from slipstream.rpc.server import KEEPALIVE_OPTIONS, MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *KEEPALIVE_OPTIONS,
    ("grpc.enable_retries", 1),
    ("grpc.service_config", retry.service_config()),
]


def aio_channel(addr: str, options: list | None = None) -> grpc.aio.Channel:
    sec = security.current()
    opts = options or CHANNEL_OPTIONS
    interceptors = security.aio_client_interceptors(sec)
    creds = sec.channel_credentials()
    if creds is not None:
        return grpc.aio.secure_channel(addr, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(addr, options=opts, interceptors=interceptors)


def sync_channel(addr: str, options: list | None = None) -> grpc.Channel:
    sec = security.current()
    opts = options or CHANNEL_OPTIONS
    creds = sec.channel_credentials()
    raw = (
        grpc.secure_channel(addr, creds, options=opts) if creds else grpc.insecure_channel(addr, options=opts)
    )
    return grpc.intercept_channel(raw, security.SyncClientInterceptor(sec))


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
