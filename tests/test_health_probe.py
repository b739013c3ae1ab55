"""The container health probe dials the way the service serves: plaintext, TLS or mTLS.

The TLS settings come from the same `SLIPSTREAM_TLS_*` variables the service reads in its
container (or the probe's `--tls-*` flags). Certificates from `test_security`'s `pki` fixture.
"""

from __future__ import annotations

import asyncio

import test_security
from machine_speed import scaled

from slipstream.rpc import health_probe, security
from slipstream.rpc.server import start_server

pki = test_security.pki  # the same fixture


def _run(server_settings: security.Settings, probes):
    async def go():
        previous = security.use(server_settings)
        try:
            service = await start_server(lambda _server: None)  # health only
        finally:
            security.use(previous)
        try:
            return [
                await asyncio.to_thread(health_probe.main, [f"127.0.0.1:{service.port}", *argv])
                for argv in probes
            ]
        finally:
            await service.stop(0.1)

    return asyncio.run(asyncio.wait_for(go(), scaled(30)))


def test_probe_speaks_mtls_from_the_service_environment(pki, monkeypatch, capsys):
    monkeypatch.setenv("SLIPSTREAM_TLS_CERT", str(pki / "svc.pem"))
    monkeypatch.setenv("SLIPSTREAM_TLS_KEY", str(pki / "svc.key"))
    monkeypatch.setenv("SLIPSTREAM_TLS_CA", str(pki / "ca.pem"))
    strangers = ["--tls-cert", str(pki / "stranger.pem"), "--tls-key", str(pki / "stranger.key"),
                 "--tls-ca", str(pki / "other-ca.pem")]  # fmt: skip
    codes = _run(test_security._tls(pki, "svc"), [[], strangers])
    assert codes == [0, 1]  # the service's own settings pass; a stranger's certificate is refused
    assert "SERVING" in capsys.readouterr().out


def test_probe_is_refused_in_plaintext_by_a_tls_server_and_says_so(pki, monkeypatch, capsys):
    for name in ("SLIPSTREAM_TLS_CERT", "SLIPSTREAM_TLS_KEY", "SLIPSTREAM_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    server = test_security._tls(pki, "svc", mutual=False)
    ca_only = ["--tls-cert", str(pki / "svc.pem"), "--tls-ca", str(pki / "ca.pem")]
    codes = _run(server, [[], ca_only, ["--tls-cert", str(pki / "missing.pem")]])
    err = capsys.readouterr().err.splitlines()
    assert codes == [1, 0, 1]
    assert err[0].startswith("unhealthy: 127.0.0.1:") and "UNAVAILABLE" in err[0]
    assert err[-1] == f"unhealthy: cannot read {pki / 'missing.pem'}: No such file or directory"
