"""`python -m slipstream.rpc.health_probe [HOST:PORT]`: exit 0 when the service answers SERVING.

The container healthcheck. Every service implements `grpc.health.v1`; this asks it once and
exits 0 (SERVING) or 1 with one line saying why not. Without an address it probes this
container's own service on loopback, at the port the service wrote into its ready file
(`SLIPSTREAM_READY_FILE`, set in the image), so one HEALTHCHECK line fits every service
whatever port it was given. Kubernetes does not need it: its probes speak gRPC health natively.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _own_address() -> str:
    ready = os.environ.get("SLIPSTREAM_READY_FILE", "")
    if not ready:
        raise ValueError("no address given and SLIPSTREAM_READY_FILE is not set")
    try:
        port = Path(ready).read_text().strip()
    except OSError:
        raise ValueError(f"not serving yet (no ready file {ready})") from None
    return f"127.0.0.1:{port}"


def probe(addr: str, timeout: float) -> str:
    """The serving status name of the service at `addr` (raises grpc.RpcError when unreachable)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slipstream.rpc.health_probe", description=__doc__)
    parser.add_argument("addr", nargs="?", help="host:port (default: this container's own service)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        addr = args.addr or _own_address()
    except ValueError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    import grpc

    try:
        status = probe(addr, args.timeout)
    except grpc.RpcError as e:
        print(f"unhealthy: {addr}: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    if status != "SERVING":
        print(f"unhealthy: {addr}: {status}", file=sys.stderr)
        return 1
    print(f"{addr}: SERVING")
    return 0


if __name__ == "__main__":
    sys.exit(main())
