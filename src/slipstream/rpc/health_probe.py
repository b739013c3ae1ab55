"""`python -m slipstream.rpc.health_probe [HOST:PORT]`: exit 0 when the service answers SERVING.

The container healthcheck. Every service implements `grpc.health.v1`; this asks it once and
exits 0 (SERVING) or 1 with one line saying why not. Without an address it probes this
container's own service on loopback, at the port the service wrote into its ready file
(`SLIPSTREAM_READY_FILE`, set in the image), so one HEALTHCHECK line fits every service
whatever port it was given. Kubernetes does not need it: its probes speak gRPC health natively.

Under TLS the probe dials TLS with the service's own settings: the container's
`SLIPSTREAM_TLS_CERT/_KEY/_CA` (the variables the service itself reads), or `--tls-*` given to
the probe. With a CA it verifies the server against it and presents the certificate (mTLS);
health needs no token (it is open, see `security.OPEN_METHODS`).
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


def tls_files(args: argparse.Namespace) -> tuple[str, str, str]:
    """(cert, key, ca) paths: the probe's flags, else the service's environment."""
    env = os.environ.get
    return (
        args.tls_cert or env("SLIPSTREAM_TLS_CERT", ""),
        args.tls_key or env("SLIPSTREAM_TLS_KEY", ""),
        args.tls_ca or env("SLIPSTREAM_TLS_CA", ""),
    )


def probe(addr: str, timeout: float, cert: str = "", key: str = "", ca: str = "") -> str:
    """The serving status name of the service at `addr` (raises grpc.RpcError when unreachable).

    TLS when `cert` is given (the service's settings), plaintext otherwise; OSError for an
    unreadable file.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if cert:
        cert_pem = Path(cert).read_bytes()
        ca_pem, key_pem = (Path(p).read_bytes() if p else None for p in (ca, key))
        mutual = ca_pem is not None and key_pem is not None
        # As the services' clients do (security.Settings), except that without a key there is no
        # client certificate to present rather than an invalid one: server-only TLS.
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca_pem,
            private_key=key_pem if mutual else None,
            certificate_chain=cert_pem if mutual else None,
        )
        channel = grpc.secure_channel(addr, creds)
    else:
        channel = grpc.insecure_channel(addr)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slipstream.rpc.health_probe", description=__doc__)
    parser.add_argument("addr", nargs="?", help="host:port (default: this container's own service)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-cert", default="", help="dial TLS (default: $SLIPSTREAM_TLS_CERT)")
    parser.add_argument("--tls-key", default="", help="client key for mTLS (default: $SLIPSTREAM_TLS_KEY)")
    parser.add_argument("--tls-ca", default="", help="CA to verify the server (default: $SLIPSTREAM_TLS_CA)")
    args = parser.parse_args(argv)
    try:
        addr = args.addr or _own_address()
    except ValueError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    import grpc

    try:
        status = probe(addr, args.timeout, *tls_files(args))
    except OSError as e:
        print(f"unhealthy: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
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
