"""Who may call what: token authentication, TLS/mTLS, and the trainer's sole right to push weights.

Each service process configures this once, from its config, in its `main()`
(`configure_process(cfg, "coordinator", prog)`); `start_server` and `aio_channel`/`sync_channel`
then apply it, so no call site knows about secrets.

- **Tokens.** With `--auth-token-file`, every RPC must carry `authorization: Bearer <token>` in
  its metadata, or it is refused with UNAUTHENTICATED before any handler runs. Health checks
  (`grpc.health.v1.Health`) stay open so load balancers, Kubernetes probes and the launcher can
  probe a service without the secret; they reveal only SERVING or not. Tokens are compared with
  `hmac.compare_digest` (constant time), read from files (mounted secrets) and never logged: a
  `Settings` prints as which files were read, not what was in them.
- **The trainer identity.** With `--trainer-token-file`, the trainer sends that token instead of
  the shared one, the coordinator accepts it wherever it accepts the shared one, and
  `Coordinator.PushWeights` accepts *only* it: anyone else gets PERMISSION_DENIED. Only the
  trainer and the coordinator read that file, so a compromised rollout server or reward service
  holds no credential that can change the policy every other server runs.
- **TLS.** With `--tls-cert/--tls-key` every server speaks TLS and every client dials TLS,
  verifying servers against `--tls-ca` (the system roots without it). With `--tls-ca` servers
  also require a client certificate that chains to it (mTLS), and clients present theirs. The
  certificate must name the address dialed (a SAN of `127.0.0.1` for the one-machine launcher).
"""

from __future__ import annotations

import hmac
import sys
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from slipstream.config import Config

AUTH_HEADER = "authorization"
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
TRAINER_ONLY = frozenset({"/slipstream.v1.Coordinator/PushWeights"})
# Calls that live as long as the peer does: no default deadline (keepalive and heartbeats bound them).
LONG_LIVED = frozenset({"/slipstream.v1.Coordinator/Attach", "/grpc.health.v1.Health/Watch"})
ROLES = ("coordinator", "rollout", "reward", "trainer", "client")
MAX_TOKEN_BYTES = 4096


class SecurityError(ValueError):
    """A security setting that cannot work (unreadable secret, bad token); one line, exit 2."""


@dataclass(frozen=True)
class Settings:
    """This process's security settings. Secret values never appear in its repr."""

    role: str = "client"
    token: bytes = field(default=b"", repr=False)  # the shared token (--auth-token-file)
    trainer_token: bytes = field(default=b"", repr=False)  # --trainer-token-file (trainer, coordinator)
    tls_cert: bytes = field(default=b"", repr=False)
    tls_key: bytes = field(default=b"", repr=False)
    tls_ca: bytes = field(default=b"", repr=False)
    default_timeout: float = 30.0  # deadline given to a call that set none (long-lived calls excepted)
    sources: tuple[str, ...] = ()  # the files read, for the log line

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def client_token(self) -> bytes:
        """The token this process sends: the trainer's own where it has one."""
        if self.role == "trainer" and self.trainer_token:
            return self.trainer_token
        return self.token

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.tls_ca or None,
            require_client_auth=bool(self.tls_ca),
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        mutual = bool(self.tls_ca)
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca or None,
            private_key=self.tls_key if mutual else None,
            certificate_chain=self.tls_cert if mutual else None,
        )

    def describe(self) -> str:
        parts = [f"tokens {'on' if self.token else 'off'}"]
        parts.append(f"trainer-only PushWeights {'on' if self.trainer_token else 'off'}")
        parts.append("mTLS" if self.tls_ca and self.tls else "TLS" if self.tls else "plaintext")
        return ", ".join(parts)


_current = Settings()


def current() -> Settings:
    return _current


def use(settings: Settings) -> Settings:
    """Install `settings` for this process (tests use it directly); returns the previous ones."""
    global _current
    previous, _current = _current, settings
    return previous


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"{flag} {path}: {e.strerror}") from None


def read_token(path: str, flag: str) -> bytes:
    """A token file's content, stripped; it must be non-empty printable ASCII (it travels as metadata)."""
    raw = _read(path, flag).strip()
    if not raw:
        raise SecurityError(f"{flag} {path}: the file is empty")
    if len(raw) > MAX_TOKEN_BYTES:
        raise SecurityError(f"{flag} {path}: longer than {MAX_TOKEN_BYTES} bytes")
    if not all(0x21 <= b < 0x7F for b in raw):
        raise SecurityError(f"{flag} {path}: a token must be printable ASCII without spaces")
    return raw


def settings_from_config(cfg: Config, role: str) -> Settings:
    """Read the secrets `role` needs from the files the config names (nothing else is read)."""
    if role not in ROLES:
        raise SecurityError(f"unknown role {role!r}")
    i = cfg.infra
    sources: list[str] = []
    token = trainer_token = b""
    if i.auth_token_file:
        token = read_token(i.auth_token_file, "--auth-token-file")
        sources.append(i.auth_token_file)
    if i.trainer_token_file and role in ("trainer", "coordinator"):
        trainer_token = read_token(i.trainer_token_file, "--trainer-token-file")
        sources.append(i.trainer_token_file)
        if token and hmac.compare_digest(token, trainer_token):
            raise SecurityError("--trainer-token-file must hold a different token than --auth-token-file")
    cert = _read(i.tls_cert, "--tls-cert") if i.tls_cert else b""
    key = _read(i.tls_key, "--tls-key") if i.tls_key else b""
    ca = _read(i.tls_ca, "--tls-ca") if i.tls_ca else b""
    sources += [p for p in (i.tls_cert, i.tls_key, i.tls_ca) if p]
    return Settings(role, token, trainer_token, cert, key, ca, i.rpc_timeout, tuple(sources))


def configure(cfg: Config, role: str) -> Settings:
    settings = settings_from_config(cfg, role)
    use(settings)
    return settings


def configure_process(cfg: Config, role: str, prog: str) -> None:
    """`configure`, exiting 2 with one line when a secret is unusable (service entry points)."""
    import logging

    try:
        settings = configure(cfg, role)
    except SecurityError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.getLogger(__name__).info("security: %s", settings.describe())


# ---- server side ---------------------------------------------------------------------------


def _bearer(metadata: Any) -> bytes:
    for key, value in metadata or ():
        if key == AUTH_HEADER:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else b""
    return b""


def _matches(presented: bytes, tokens: list[bytes]) -> bool:
    # Every candidate is compared (no early exit), each in constant time.
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(presented, t)
    return ok and bool(presented)


def check_call(method: str, metadata: Any, settings: Settings) -> tuple[grpc.StatusCode, str] | None:
    """Why a call must be refused (code, reason), or None when it may proceed."""
    if method in OPEN_METHODS:
        return None
    presented = _bearer(metadata)
    if method in TRAINER_ONLY and settings.trainer_token:
        if _matches(presented, [settings.trainer_token]):
            return None
        if _matches(presented, [settings.token]) or not settings.token:
            return grpc.StatusCode.PERMISSION_DENIED, f"{method}: only the trainer may call it"
        return grpc.StatusCode.UNAUTHENTICATED, f"{method}: missing or wrong trainer token"
    accepted = [t for t in (settings.token, settings.trainer_token) if t]
    if not settings.token or _matches(presented, accepted):
        return None
    why = "no token" if not presented else "wrong token"
    return grpc.StatusCode.UNAUTHENTICATED, f"{method}: {why} (authorization: Bearer <--auth-token-file>)"


def _refusal(code: grpc.StatusCode, reason: str):
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, reason)

    return refuse


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the right token before any handler (or request decoding) runs."""

    def __init__(self, settings: Settings):
        self.settings = settings

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        verdict = check_call(
            handler_call_details.method, handler_call_details.invocation_metadata, self.settings
        )
        if verdict is None:
            return handler
        # Same kind of handler, raw bytes in: a refused request is never even parsed.
        refuse = _refusal(*verdict)
        kind = next(
            k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k)
        )
        return handler._replace(**{kind: refuse}, request_deserializer=None)


def needs_server_interceptor(settings: Settings) -> bool:
    return bool(settings.token or settings.trainer_token)


# ---- client side ---------------------------------------------------------------------------


def _with_defaults(method: str, timeout: float | None, metadata: Any, settings: Settings):
    """(timeout, metadata) of an outgoing call: the default deadline and this process's token added."""
    if timeout is None and method not in LONG_LIVED:
        timeout = settings.default_timeout
    pairs = list(metadata or ())
    token = settings.client_token
    if token and not any(k == AUTH_HEADER for k, _ in pairs):
        pairs.append((AUTH_HEADER, "Bearer " + token.decode()))
    return timeout, pairs


def _method_name(method: Any) -> str:
    return method.decode() if isinstance(method, bytes) else method


class _AioDefaults:
    """Adds the token and a default deadline to calls of a `grpc.aio` channel (one kind per class:
    an aio channel files each interceptor under the first kind it implements)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        timeout, pairs = _with_defaults(_method_name(d.method), d.timeout, d.metadata, self.settings)
        return grpc.aio.ClientCallDetails(
            d.method, timeout, grpc.aio.Metadata(*pairs), d.credentials, d.wait_for_ready
        )


class _AioUnaryUnary(_AioDefaults, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioDefaults, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioDefaults, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioDefaults, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def aio_client_interceptors(settings: Settings) -> list:
    return [cls(settings) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


class _SyncDetails(
    namedtuple("_SyncDetails", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    pass


class SyncClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The same for a synchronous channel (the trainer's)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def _details(self, d: grpc.ClientCallDetails) -> _SyncDetails:
        timeout, pairs = _with_defaults(_method_name(d.method), d.timeout, d.metadata, self.settings)
        return _SyncDetails(
            d.method,
            timeout,
            pairs,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
