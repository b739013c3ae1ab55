"""Starting a gRPC service the same way everywhere.

Every service: a `grpc.aio` server with the standard `grpc.health.v1` service, keepalive,
message-size limits sized for weight chunks, bound to `--host/--port` (port 0 picks a free
one), its actual port written to `--ready-file` once it serves, and a graceful stop on
SIGTERM/SIGINT (health turns NOT_SERVING first, then in-flight calls get a grace period).

Security comes from the process's settings (`slipstream.rpc.security`, configured once in the
service's `main()`): a TLS port instead of a plaintext one, and the token check as the first
interceptor, so a refused call never reaches a handler or the metrics of one.

Keepalive is configured on both ends (`keepalive_options`, shared with `channel.py`): each side
pings an idle connection every 20 s and drops it when a ping goes unanswered for 10 s, so a
peer that froze or vanished without closing its socket (a SIGSTOPped process, a dead host, a cut
network) breaks its streams within ~30 s, and the coordinator re-dispatches its leases. Servers
accept pings every 10 s even without calls in flight; otherwise they would count the clients'
20 s pings as abuse and answer GOAWAY "too_many_pings".
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slipstream.log import mark_up
from slipstream.rpc import security
from slipstream.rpc.health import HealthServicer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS = 20_000, 10_000


def keepalive_options(time_ms: int = KEEPALIVE_TIME_MS, timeout_ms: int = KEEPALIVE_TIMEOUT_MS) -> list:
    """Keepalive channel arguments, the same on servers and clients (tests shrink the times)."""
    return [
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # gRPC core (1.7x/1.8x) times keepalive pings out with the *ping* timeout (default 60 s)
        # and never fires keepalive_timeout alone (grpc/grpc#39239): set both, or a frozen peer
        # takes keepalive time + 60 s to detect. Measured by tests/chaos/test_chaos_keepalive.py.
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # What a server accepts from clients (and a client's own floor): half the ping period.
        ("grpc.http2.min_ping_interval_without_data_ms", time_ms // 2),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", time_ms // 2),
    ]


KEEPALIVE_OPTIONS = keepalive_options()
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *KEEPALIVE_OPTIONS,
]


class Service:
    """A started server: its port, its health servicer, and a way to wait for shutdown."""

    def __init__(self, server: grpc.aio.Server, health_servicer: HealthServicer, port: int):
        self.server = server
        self.health = health_servicer
        self.port = port
        self.stopping = asyncio.Event()
        self._health_updates: set[asyncio.Task] = set()

    def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING (to Check at once, to Watch streams on the next loop turn)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        task = asyncio.get_running_loop().create_task(self.health.set("", status))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING for good (probers and load balancers learn first), then finish in-flight calls."""
        await self.health.enter_graceful_shutdown()
        self.stopping.set()
        await self.server.stop(grace)


async def start_server(
    add_servicers: Callable[[grpc.aio.Server], None],
    host: str = "127.0.0.1",
    port: int = 0,
    ready_file: str = "",
    interceptors: list | None = None,
    options: list | None = None,
    up: bool = True,
) -> Service:
    """Build, bind and start a server; `add_servicers(server)` registers the service's handlers.

    `up`: serving means the process is up (`slipstream.log.mark_up`: later errors exit 1); the
    trainer serves before its model is loaded and says so itself."""
    sec = security.current()
    if security.needs_server_interceptor(sec):
        interceptors = [security.AuthInterceptor(sec), *(interceptors or [])]
    server = grpc.aio.server(options=options or SERVER_OPTIONS, interceptors=interceptors or [])
    add_servicers(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    creds = sec.server_credentials()
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    service = Service(server, health_servicer, bound)  # health starts SERVING
    if ready_file:
        tmp = Path(ready_file).with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(str(bound))
        os.replace(tmp, ready_file)  # atomic: readers never see a half-written port
    log.info("serving on %s:%d (%s)", host, bound, sec.describe())
    if up:
        mark_up()
    return service


def install_signal_handlers(on_signal: Callable[[], Awaitable[None]]) -> None:
    """SIGTERM and SIGINT schedule `on_signal()` once (a graceful stop)."""
    loop = asyncio.get_running_loop()
    fired = False

    def handler() -> None:
        nonlocal fired
        if not fired:
            fired = True
            loop.create_task(on_signal())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler)


def exit_now(code: int = 0) -> NoReturn:
    """End a service whose work is done and closed without Python's interpreter teardown: with
    torch loaded that garbage-collects every module for a second or more, and joins any thread
    still running, which is most of a service's shutdown. Logs and std streams are flushed first;
    the files a service writes are closed by its own stop."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_async(main: Awaitable[None]) -> None:
    """asyncio.run with uvloop when it is installed."""
    try:
        import uvloop

        uvloop.run(main)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(main)  # type: ignore[arg-type]
