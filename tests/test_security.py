"""Security and RPC hygiene of the gRPC plumbing, over real servers and channels on loopback.

Token authentication (missing, wrong, right; health open), the trainer-only PushWeights,
TLS and mTLS with certificates made by `openssl`, secrets kept out of reprs, config and logs,
retries (idempotent calls on UNAVAILABLE only) and the default deadline.

The servicer here is a small stand-in for the coordinator's *interface*: what is under test is
the interceptors, credentials and channel options, which every real service gets the same way.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slipstream.config import ConfigError, config_from_values
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from slipstream.rpc import retry, security
from slipstream.rpc.channel import aio_channel, sync_channel
from slipstream.rpc.server import start_server

TOKEN, TRAINER, OTHER = b"mesh-token-0123456789", b"trainer-token-9876543210", b"not-the-token"


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Counts calls; fails the first `fail_first` of each method with UNAVAILABLE."""

    def __init__(self, fail_first: int = 0, sleep_s: float = 0.0):
        self.calls: dict[str, int] = {}
        self.fail_first = fail_first
        self.sleep_s = sleep_s

    async def _enter(self, name: str, context) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.fail_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if self.sleep_s:
            await asyncio.sleep(self.sleep_s)

    async def GetStatus(self, request, context):
        await self._enter("GetStatus", context)
        return coordinator_pb2.CoordinatorStatus(policy_version=7)

    async def PushWeights(self, request_iterator, context):
        await self._enter("PushWeights", context)
        n = 0
        async for _ in request_iterator:
            n += 1
        return coordinator_pb2.PushWeightsReply(version=n)


def _push_messages() -> list[types_pb2.WeightMessage]:
    return [types_pb2.WeightMessage(manifest=types_pb2.WeightManifest(version=1))]


def _settings(role: str = "client", **kw) -> security.Settings:
    return security.Settings(role=role, **kw)


async def _serve(servicer, server_settings: security.Settings):
    previous = security.use(server_settings)
    try:
        return await start_server(
            lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s)
        )
    finally:
        security.use(previous)


def _channel(port: int, client_settings: security.Settings) -> grpc.aio.Channel:
    previous = security.use(client_settings)
    try:
        return aio_channel(f"127.0.0.1:{port}")
    finally:
        security.use(previous)


async def _status(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await coordinator_pb2_grpc.CoordinatorStub(channel).GetStatus(
            coordinator_pb2.GetStatusRequest(), timeout=5
        )
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


async def _push(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str]:
    try:
        await coordinator_pb2_grpc.CoordinatorStub(channel).PushWeights(iter(_push_messages()), timeout=5)
        return grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""


def test_tokens_are_required_and_health_stays_open():
    async def go():
        servicer = FakeCoordinator()
        service = await _serve(servicer, _settings("coordinator", token=TOKEN))
        try:
            codes = {}
            for name, token in (("none", b""), ("wrong", OTHER), ("right", TOKEN)):
                channel = _channel(service.port, _settings(token=token))
                codes[name] = await _status(channel)
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING, name
                await channel.close()
            return codes, servicer.calls
        finally:
            await service.stop(0)

    codes, calls = asyncio.run(go())
    assert codes == {
        "none": grpc.StatusCode.UNAUTHENTICATED,
        "wrong": grpc.StatusCode.UNAUTHENTICATED,
        "right": grpc.StatusCode.OK,
    }
    assert calls == {"GetStatus": 1}  # refused calls never reached the handler


def test_only_the_trainer_may_push_weights():
    async def go():
        servicer = FakeCoordinator()
        service = await _serve(servicer, _settings("coordinator", token=TOKEN, trainer_token=TRAINER))
        try:
            out = {}
            for name, settings in (
                ("rollout", _settings("rollout", token=TOKEN)),
                ("nobody", _settings()),
                ("trainer", _settings("trainer", token=TOKEN, trainer_token=TRAINER)),
            ):
                channel = _channel(service.port, settings)
                out[name] = (await _push(channel))[0], await _status(channel)
                await channel.close()
            return out, servicer.calls
        finally:
            await service.stop(0)

    out, calls = asyncio.run(go())
    # A service holding the shared token is known but not allowed; the trainer's token also
    # opens the other methods.
    assert out["rollout"] == (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK)
    assert out["nobody"] == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED)
    assert out["trainer"] == (grpc.StatusCode.OK, grpc.StatusCode.OK)
    assert calls["PushWeights"] == 1


def test_the_sync_channel_sends_the_trainer_token():
    async def go():
        servicer = FakeCoordinator()
        service = await _serve(servicer, _settings("coordinator", token=TOKEN, trainer_token=TRAINER))
        try:
            previous = security.use(_settings("trainer", token=TOKEN, trainer_token=TRAINER))
            try:
                channel = sync_channel(f"127.0.0.1:{service.port}")
            finally:
                security.use(previous)
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            reply = await asyncio.to_thread(stub.PushWeights, iter(_push_messages()), timeout=5)
            status = await asyncio.to_thread(stub.GetStatus, coordinator_pb2.GetStatusRequest())
            channel.close()
            return reply.version, status.policy_version
        finally:
            await service.stop(0)

    assert asyncio.run(go()) == (1, 7)


# ---- TLS ---------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a certificate for 127.0.0.1 signed by it (server and client use), and a stranger's."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=d)  # fmt: skip
        name = "svc" if ca == "ca" else "stranger"
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)  # fmt: skip
    return d


def _tls(d: Path, name: str, ca: str = "ca", mutual: bool = True, **kw) -> security.Settings:
    return security.Settings(
        tls_cert=(d / f"{name}.pem").read_bytes(),
        tls_key=(d / f"{name}.key").read_bytes(),
        tls_ca=(d / f"{ca}.pem").read_bytes() if mutual else b"",
        **kw,
    )


def test_mtls_admits_only_certificates_of_the_ca(pki):
    async def go():
        servicer = FakeCoordinator()
        service = await _serve(servicer, _tls(pki, "svc", role="coordinator"))
        try:
            out = {}
            for name, settings in (
                ("member", _tls(pki, "svc")),
                ("stranger", _tls(pki, "stranger")),  # its own CA: cannot verify us, nor we it
                ("stranger-trusting-us", _tls(pki, "stranger", ca="ca")),
                ("plaintext", _settings()),
            ):
                channel = _channel(service.port, settings)
                out[name] = await _status(channel)
                await channel.close()
            return out
        finally:
            await service.stop(0)

    out = asyncio.run(go())
    assert out["member"] == grpc.StatusCode.OK
    assert out["stranger"] == grpc.StatusCode.UNAVAILABLE
    assert out["stranger-trusting-us"] == grpc.StatusCode.UNAVAILABLE  # its certificate is not ours
    assert out["plaintext"] == grpc.StatusCode.UNAVAILABLE


def test_tls_with_tokens(pki):
    """Server-side TLS (no client certificates) plus tokens: the token is what admits a caller."""

    async def go():
        service = await _serve(
            FakeCoordinator(), _tls(pki, "svc", mutual=False, role="coordinator", token=TOKEN)
        )
        try:
            out = {}
            for name, token in (("right", TOKEN), ("none", b"")):
                # Clients verify the server against the CA (the test CA is not a system root).
                settings = security.Settings(tls_cert=b"x", tls_ca=(pki / "ca.pem").read_bytes(), token=token)
                settings = _client_of(settings)
                channel = _channel(service.port, settings)
                out[name] = await _status(channel)
                await channel.close()
            return out
        finally:
            await service.stop(0)

    assert asyncio.run(go()) == {"right": grpc.StatusCode.OK, "none": grpc.StatusCode.UNAUTHENTICATED}


def _client_of(settings: security.Settings) -> security.Settings:
    """Client-only TLS settings: verify against the CA, present no certificate."""

    class ClientOnly(security.Settings):
        def channel_credentials(self):
            return grpc.ssl_channel_credentials(root_certificates=self.tls_ca)

    return ClientOnly(**{f: getattr(settings, f) for f in settings.__dataclass_fields__})


# ---- secrets out of sight -------------------------------------------------------------------


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_secrets_are_read_from_files_and_never_shown(tmp_path):
    cfg = config_from_values(
        {
            "auth_token_file": _write(tmp_path / "token", TOKEN.decode() + "\n"),
            "trainer_token_file": _write(tmp_path / "trainer", TRAINER.decode()),
        }
    )
    trainer = security.settings_from_config(cfg, "trainer")
    rollout = security.settings_from_config(cfg, "rollout")
    assert trainer.client_token == TRAINER and rollout.client_token == TOKEN
    assert rollout.trainer_token == b""  # only the trainer and the coordinator read that file
    for shown in (repr(trainer), str(trainer), trainer.describe(), json.dumps(cfg.to_dict())):
        assert TOKEN.decode() not in shown and TRAINER.decode() not in shown
    assert str(tmp_path / "token") in json.dumps(cfg.to_dict())  # the config holds paths only


@pytest.mark.parametrize(
    ("content", "needle"),
    [("", "empty"), ("two words", "printable ASCII"), (TOKEN.decode(), "different token")],
)
def test_unusable_tokens_are_one_line_errors(tmp_path, content, needle):
    cfg = config_from_values(
        {
            "auth_token_file": _write(tmp_path / "token", TOKEN.decode()),
            "trainer_token_file": _write(tmp_path / "trainer", content),
        }
    )
    with pytest.raises(security.SecurityError, match=needle):
        security.settings_from_config(cfg, "coordinator")


def test_config_checks_secret_files(tmp_path):
    with pytest.raises(ConfigError, match="--auth-token-file .*no such file"):
        config_from_values({"auth_token_file": str(tmp_path / "missing")})
    cert = _write(tmp_path / "cert.pem", "x")
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        config_from_values({"tls_cert": cert})
    with pytest.raises(ConfigError, match="--tls-ca"):
        config_from_values({"tls_ca": cert})


def test_a_service_exits_with_one_line_on_an_unusable_secret(tmp_path):
    import sys

    empty = _write(tmp_path / "token", "")
    proc = subprocess.run(
        [sys.executable, "-m", "slipstream.services.reward", "--auth-token-file", empty, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"slipstream reward: error: --auth-token-file {empty}: the file is empty"
    )


# ---- retries and deadlines ----------------------------------------------------------------


def test_idempotent_calls_are_retried_on_unavailable_and_pushes_are_not():
    async def go():
        servicer = FakeCoordinator(fail_first=2)
        service = await _serve(servicer, _settings("coordinator"))
        try:
            channel = _channel(service.port, _settings())
            status = await _status(channel)
            push = (await _push(channel))[0]
            await channel.close()
            return status, push, servicer.calls
        finally:
            await service.stop(0)

    status, push, calls = asyncio.run(go())
    assert status == grpc.StatusCode.OK and calls["GetStatus"] == 3  # two UNAVAILABLE, then served
    assert push == grpc.StatusCode.UNAVAILABLE and calls["PushWeights"] == 1
    assert retry.is_idempotent("/slipstream.v1.Coordinator/ReportProgress")
    assert not retry.is_idempotent("/slipstream.v1.Coordinator/PushWeights")
    assert not retry.is_idempotent("/slipstream.v1.Coordinator/Attach")


def test_a_call_without_a_deadline_gets_the_default_one():
    async def go():
        service = await _serve(FakeCoordinator(sleep_s=5.0), _settings("coordinator"))
        try:
            channel = _channel(service.port, _settings(default_timeout=0.3))
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await coordinator_pb2_grpc.CoordinatorStub(channel).GetStatus(
                    coordinator_pb2.GetStatusRequest()
                )
            await channel.close()
            return err.value.code(), loop.time() - t0
        finally:
            await service.stop(0)

    code, seconds = asyncio.run(go())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and seconds < 2.0


def test_a_redis_password_in_the_url_never_reaches_config_json_or_the_console(tmp_path):
    from slipstream.buffer.embedded import EmbeddedRedis
    from slipstream.buffer.replay import ReplayBuffer
    from slipstream.launcher import keep_password_out_of_config
    from slipstream.log import config_table

    password = "s3cret-Pass_word.42"
    with EmbeddedRedis(tmp_path / "redis", password=password) as server:
        from urllib.parse import quote

        url = server.url.replace(password, quote(password, safe=""))
        cfg = config_from_values({"redis_url": url, "run_dir": str(tmp_path / "run")})
        shown = config_table(cfg)  # config.txt's table
        keep_password_out_of_config(cfg, tmp_path / "run")
        cfg.save_json(tmp_path / "run" / "config.json")
        saved = (tmp_path / "run" / "config.json").read_text()
        for text in (saved, shown):
            assert password not in text and quote(password, safe="") not in text
        secret = Path(cfg.infra.redis_password_file)
        assert secret.read_text() == password and secret.stat().st_mode & 0o077 == 0
        with ReplayBuffer(cfg.infra.redis_connect_url, "auth") as buffer:
            buffer.ping()  # the services still connect, reading the password from the file
