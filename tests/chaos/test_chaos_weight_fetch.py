"""A weight transfer cut or damaged on its way to a rollout server is fetched again, never applied broken.

A real coordinator holds a pushed version; a real rollout server reaches the coordinator through
a small TCP proxy in this process (asyncio, loopback) that hurts the first large transfer once,
after `HURT_AFTER` bytes of coordinator->server traffic, then passes everything unchanged:

- **cut**: both sockets are aborted mid-transfer. The rollout server multiplexes `Attach`,
  health and `FetchWeights` on one HTTP/2 connection to the coordinator, so the cut breaks the
  Attach stream too. Two paths could then recover the version: the fetch's own retry
  (`_apply_weights`: same version again after 0.5 s, fresh stager), or the re-attach (the
  coordinator announces the version it holds to every server that attaches with an older
  one). The retry is what recovers it: the re-attach's notice queues behind the retrying fetch
  on the weights lock and finds the version already applied. The test asserts both the retry
  line and the re-attach, and that the version was applied exactly once, never refused.
- **flip**: one byte in the middle of a large HTTP/2 DATA frame of the transfer is inverted
  (the frame is well formed, its payload is damaged: a chunk's sha256 fails). Nothing breaks
  the connection, so only the retry can recover it; the damaged copy must not be applied.

The model is larger than the suite's tiny one so that a version (~1.6 MB in FP8) spans many
HTTP/2 frames. Printed: time from the hurt to the rollout server serving the version.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from chaos_mesh import ChaosMesh, tiny_values, wait_for
from machine_speed import scaled

from mesh_fixtures import build_tiny_model
from slipstream.models.hf import load_model
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from slipstream.rpc import security
from slipstream.rpc.channel import aio_channel
from slipstream.weights import iter_messages, pack, weights_to_sync

HURT_AFTER = 256 * 1024  # bytes of coordinator->server traffic before the (one) hurt
DATA_FRAME, LARGE_FRAME = 0, 4096  # HTTP/2 frame type DATA; a frame this big is weight bytes


class HurtingProxy:
    """Loopback TCP proxy to `upstream` that hurts the first transfer past `HURT_AFTER` bytes once."""

    def __init__(self, upstream_port: int, mode: str):
        assert mode in ("cut", "flip")
        self.upstream_port, self.mode = upstream_port, mode
        self.hurt_at: float | None = None  # time.monotonic() of the hurt
        self.num_connections = 0
        self._down = 0  # coordinator->server bytes so far, all connections
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, client_r, client_w) -> None:
        self.num_connections += 1
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        writers = (client_w, up_w)
        up = asyncio.ensure_future(self._pipe(client_r, up_w, writers, down=False))
        down = asyncio.ensure_future(self._pipe(up_r, client_w, writers, down=True))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for w in writers:
            w.transport.abort()
        for task in (up, down):
            task.cancel()

    async def _pipe(self, reader, writer, writers, down: bool) -> None:
        frames = bytearray()  # coordinator->server bytes not yet forwarded whole (flip mode)
        while data := await reader.read(65536):
            if not down:
                writer.write(data)
                await writer.drain()
                continue
            self._down += len(data)
            if self.mode == "cut" and self.hurt_at is None and self._down > HURT_AFTER:
                self.hurt_at = time.monotonic()
                for w in writers:  # as abrupt as a pulled cable: no FIN, no GOAWAY
                    w.transport.abort()
                return
            if self.mode == "flip":
                frames += data
                data = self._whole_frames(frames)
            writer.write(data)
            await writer.drain()

    def _whole_frames(self, buf: bytearray) -> bytes:
        """Take the complete HTTP/2 frames off `buf` (the server->client side has no preface),
        flipping one payload byte of the first large DATA frame past HURT_AFTER."""
        out = bytearray()
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            frame = buf[: 9 + length]
            del buf[: 9 + length]
            if (
                self.hurt_at is None
                and self._down > HURT_AFTER
                and frame[3] == DATA_FRAME
                and length >= LARGE_FRAME
            ):
                frame[9 + length // 2] ^= 0xFF
                self.hurt_at = time.monotonic()
            out += frame
        return bytes(out)

    def close(self) -> None:
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def larger_model(tmp_path_factory):
    """~1.6M parameters: a version is ~1.6 MB in FP8, far past HURT_AFTER."""
    out = tmp_path_factory.mktemp("weight-fetch") / "model"
    return build_tiny_model(out, hidden_size=256, intermediate_size=768, head_dim=64)


def _client(addr: str, settings: security.Settings) -> grpc.aio.Channel:
    previous = security.use(settings)
    try:
        return aio_channel(addr)
    finally:
        security.use(previous)


async def _aiter(messages):
    for m in messages:
        yield m


@pytest.mark.parametrize("mode", ["cut", "flip"])
def test_a_hurt_weight_transfer_is_fetched_again(mode, larger_model, chaos_assets, tmp_path, redis_url):
    _, prompts = chaos_assets
    run = tmp_path / "run"
    mesh = ChaosMesh(run, tiny_values(larger_model, prompts, run, redis_url))
    proxy = None
    try:
        mesh.start_reward()
        coordinator = mesh.start_coordinator()
        proxy = HurtingProxy(coordinator.port, mode)
        rollout = mesh.start(
            "rollout-0", "rollout", "--coordinator-addr", proxy.addr, "--server-id", "rollout-0"
        )
        model = load_model(larger_model)
        manifest, chunks = pack(
            weights_to_sync(model.state_dict(), model.config.tie_word_embeddings), 1, "fp8", 256 * 1024
        )
        assert manifest.total_bytes > 4 * HURT_AFTER

        async def go() -> float:
            trainer = _client(coordinator.addr, mesh.client_settings("trainer"))
            to_rollout = _client(rollout.addr, mesh.client_settings("rollout"))
            stub = coordinator_pb2_grpc.CoordinatorStub(trainer)
            info = rollout_pb2_grpc.RolloutStub(to_rollout)
            while (
                await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)
            ).num_rollout_servers < 1:
                await asyncio.sleep(0.05)
            await stub.PushWeights(_aiter(iter_messages(manifest, chunks)), timeout=30)
            deadline = time.monotonic() + scaled(30)
            while (await info.GetInfo(rollout_pb2.GetInfoRequest(), timeout=5)).policy_version != 1:
                assert time.monotonic() < deadline, f"version 1 never served:\n{rollout.log()[-3000:]}"
                await asyncio.sleep(0.02)
            serving_at = time.monotonic()
            await trainer.close()
            await to_rollout.close()
            return serving_at

        serving_at = asyncio.run(asyncio.wait_for(go(), scaled(90)))
        assert proxy.hurt_at is not None, f"the transfer never passed {HURT_AFTER} bytes"
        # The coordinator hears of it: by WeightsApplied on the stream that is up when the version
        # is applied, or, when the fetch's retry applied it while the cut stream was still down (the
        # event then has no live stream: it is not queued for the next one), by the version the
        # re-attach's Hello carries. The re-attach backs off 0.5 s doubling to 5 s (attach.py).
        heard = ("rollout-0 serves version 1", "rollout server rollout-0 attached (capacity ")
        wait_for(
            lambda: (
                heard[0] in (text := coordinator.log())
                or any(line.endswith("version 1)") for line in text.splitlines() if heard[1] in line)
            ),
            30,
            "the coordinator hearing that rollout-0 serves version 1",
        )
    finally:
        mesh.stop()
        if proxy is not None:
            proxy.close()

    log = rollout.log()
    assert log.count("now serving weights version 1") == 1, log[-3000:]
    assert "weights version 1 refused" not in log, log[-3000:]  # never applied broken, never given up
    retries = [line for line in log.splitlines() if "weights version 1: fetch attempt" in line]
    assert retries, f"no fetch retry in the rollout log:\n{log[-3000:]}"
    reattached = log.count("attached to coordinator") > 1
    if mode == "cut":
        # One HTTP/2 connection carries Attach and FetchWeights: the cut broke both. The
        # fetch's retry applied the version; the re-attach's notice found it applied.
        assert reattached and "coordinator stream down" in log, log[-3000:]
        assert proxy.num_connections >= 2
    else:
        assert "fails its sha256 check" in retries[0], retries[0]
        assert not reattached  # the connection was never broken: only the retry could recover it
    print(
        f"weight transfer {mode} after {HURT_AFTER // 1024} KiB: serving version 1 "
        f"{serving_at - proxy.hurt_at:.2f}s later ({len(retries)} retry; re-attached: {reattached}); "
        f"retry line: {retries[0].split('server: ')[-1][:160]}"
    )
