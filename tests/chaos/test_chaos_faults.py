"""Faults against a live, authenticated mesh (separate processes, real gRPC, real Redis).

- wrong or missing tokens are refused; a service's token cannot push weights;
- malformed and oversized messages get INVALID_ARGUMENT / RESOURCE_EXHAUSTED and the services
  keep serving;
- corrupt, truncated and cut weight pushes are refused and the old version keeps serving, then
  a good version reaches the rollout server;
- SIGKILL of a rollout server mid-generation: its leases go to the other server, the run
  completes, every stored group is unique and every consumed one acknowledged.

Figures printed here (time to reassign, time to apply a version) are what docs/reliability.md
reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import grpc
import pytest
import redis
from chaos_mesh import MESH_TOKEN, ChaosMesh, tiny_values
from machine_speed import scaled

from mesh_fixtures import push_like_the_trainer
from slipstream.models.hf import load_model
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, rollout_pb2, rollout_pb2_grpc, types_pb2
from slipstream.rpc import security
from slipstream.rpc.channel import aio_channel, sync_channel
from slipstream.weights import iter_messages, pack, weights_to_sync


def _client(mesh: ChaosMesh, addr: str, settings: security.Settings) -> grpc.aio.Channel:
    previous = security.use(settings)
    try:
        return aio_channel(addr)
    finally:
        security.use(previous)


async def _push_code(addr: str, settings: security.Settings, messages) -> grpc.StatusCode:
    """The status of a push made as the trainer makes it (`push_like_the_trainer`: a blocking stub,
    whose status is the server's even when the server refuses mid-stream)."""
    previous = security.use(settings)
    try:
        channel = sync_channel(addr)
    finally:
        security.use(previous)
    try:
        await asyncio.to_thread(push_like_the_trainer, channel, messages, 30)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()


async def _code(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


async def _aiter(messages):
    for m in messages:
        yield m


async def _stall(messages, after: int):
    for i, m in enumerate(messages):
        if i == after:
            await asyncio.Event().wait()  # the pusher hangs here until its call is cancelled
        yield m


def _synced_weights(path) -> dict:
    """The tensors a version carries, as the trainer sends them (a tied LM head stays home)."""
    m = load_model(path)
    return weights_to_sync(m.state_dict(), m.config.tie_word_embeddings)


@pytest.fixture
def mesh(chaos_assets, tmp_path, redis_url):
    model, prompts = chaos_assets
    m = ChaosMesh(tmp_path / "run", tiny_values(model, prompts, tmp_path / "run", redis_url))
    try:
        yield m
    finally:
        m.stop()


def test_auth_malformed_oversized_and_broken_weights(mesh, chaos_assets):
    model, _ = chaos_assets
    mesh.start_reward()
    coordinator = mesh.start_coordinator()
    rollout = mesh.start_rollout(0)
    sd = _synced_weights(model)
    pushes = {v: pack(sd, v, "fp8", chunk_bytes=8192) for v in (1, 2)}

    async def go():
        rollout_settings = mesh.client_settings("rollout")
        as_trainer = mesh.client_settings("trainer")
        trainer = _client(mesh, coordinator.addr, as_trainer)
        as_rollout = _client(mesh, coordinator.addr, rollout_settings)
        nobody = _client(mesh, coordinator.addr, security.Settings())
        wrong = _client(mesh, coordinator.addr, security.Settings(token=b"guess" + MESH_TOKEN.encode()))
        stub = coordinator_pb2_grpc.CoordinatorStub(trainer)
        rollout_info = rollout_pb2_grpc.RolloutStub(_client(mesh, rollout.addr, rollout_settings))
        out: dict[str, object] = {}

        async def status():
            return await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)

        while (await status()).num_rollout_servers < 1:
            await asyncio.sleep(0.1)

        # --- authentication
        for name, ch in (("nobody", nobody), ("wrong", wrong)):
            out[f"status/{name}"] = await _code(
                coordinator_pb2_grpc.CoordinatorStub(ch).GetStatus(
                    coordinator_pb2.GetStatusRequest(), timeout=5
                )
            )
        manifest, chunks = pushes[1]
        out["push/rollout-token"] = await _push_code(
            coordinator.addr, rollout_settings, iter_messages(manifest, chunks)
        )

        # --- malformed and oversized
        def attach(first):
            call = coordinator_pb2_grpc.CoordinatorStub(as_rollout).Attach(_aiter([first]))

            async def drain():
                async for _ in call:
                    pass

            return drain()

        beat = coordinator_pb2.RolloutEvent(heartbeat=coordinator_pb2.Heartbeat())
        out["attach/no-hello"] = await _code(attach(beat))
        zero = coordinator_pb2.RolloutEvent(
            hello=coordinator_pb2.Hello(server_id="x", max_concurrent_samples=0)
        )
        out["attach/zero-capacity"] = await _code(attach(zero))
        huge = types_pb2.WeightMessage(chunk=types_pb2.WeightChunk(version=1, data=b"\0" * (65 << 20)))
        out["push/oversized"] = await _push_code(coordinator.addr, as_trainer, [huge])

        # --- broken weight pushes, as the trainer
        corrupt = list(iter_messages(manifest, chunks))
        bad = types_pb2.WeightMessage()
        bad.CopyFrom(corrupt[2])
        bad.chunk.data = bytes([bad.chunk.data[0] ^ 1]) + bad.chunk.data[1:]
        corrupt[2] = bad
        out["push/corrupt"] = await _push_code(coordinator.addr, as_trainer, corrupt)
        out["push/truncated"] = await _push_code(
            coordinator.addr, as_trainer, list(iter_messages(manifest, chunks))[:-1]
        )
        # Cut mid-stream (the trainer died, the connection broke): the coordinator commits nothing.
        call = stub.PushWeights(_stall(iter_messages(manifest, chunks), 2), timeout=10)
        await asyncio.sleep(0.5)
        out["push/cut"] = call.cancel()
        out["version/after-broken"] = (await status()).policy_version
        info = await rollout_info.GetInfo(rollout_pb2.GetInfoRequest(), timeout=5)
        out["rollout-version/after-broken"] = info.policy_version

        # --- a good version goes through; a corrupt newer one leaves it serving
        t0 = time.monotonic()
        out["push/good"] = await _push_code(coordinator.addr, as_trainer, iter_messages(manifest, chunks))
        while (await rollout_info.GetInfo(rollout_pb2.GetInfoRequest(), timeout=5)).policy_version != 1:
            assert time.monotonic() - t0 < 30, "version 1 never applied"
            await asyncio.sleep(0.05)
        out["apply_s"] = time.monotonic() - t0
        m2, c2 = pushes[2]
        broken2 = list(iter_messages(m2, c2))
        broken2[-1].chunk.data = broken2[-1].chunk.data[:-1]
        out["push/corrupt-v2"] = await _push_code(coordinator.addr, as_trainer, broken2)
        await asyncio.sleep(0.5)
        out["rollout-version/end"] = (
            await rollout_info.GetInfo(rollout_pb2.GetInfoRequest(), timeout=5)
        ).policy_version
        final = await status()
        out["end"] = (final.policy_version, final.num_rollout_servers)
        for ch in (trainer, as_rollout, nobody, wrong):
            await ch.close()
        return out

    out = asyncio.run(asyncio.wait_for(go(), scaled(120)))
    C = grpc.StatusCode
    assert out["status/nobody"] == C.UNAUTHENTICATED and out["status/wrong"] == C.UNAUTHENTICATED
    assert out["push/rollout-token"] == C.PERMISSION_DENIED
    assert out["attach/no-hello"] == C.INVALID_ARGUMENT
    assert out["attach/zero-capacity"] == C.INVALID_ARGUMENT
    assert out["push/oversized"] == C.RESOURCE_EXHAUSTED
    assert out["push/corrupt"] == C.INVALID_ARGUMENT and out["push/truncated"] == C.INVALID_ARGUMENT
    assert out["push/cut"] is True  # cancelled mid-stream; the version below shows nothing was committed
    assert out["version/after-broken"] == 0 and out["rollout-version/after-broken"] == 0
    assert out["push/good"] == C.OK
    assert out["push/corrupt-v2"] == C.INVALID_ARGUMENT
    assert out["rollout-version/end"] == 1  # the old (good) version keeps serving
    assert out["end"] == (1, 1)  # and the coordinator still serves, the rollout server still attached
    assert coordinator.alive() and rollout.alive()
    print(f"weight version applied {out['apply_s']:.2f}s after the push began")


def test_sigkill_a_rollout_server_mid_generation(chaos_assets, tmp_path, redis_url):
    model, prompts = chaos_assets
    values = tiny_values(
        model, prompts, tmp_path / "run", redis_url,
        num_rollout=4, rollout_max_response_len=24, rollout_max_batch_size=4, rollout_temperature=1.0,
    )  # fmt: skip
    mesh = ChaosMesh(tmp_path / "run", values)
    try:
        mesh.start_reward()
        coordinator = mesh.start_coordinator()
        mesh.start_rollout(0)
        victim = mesh.start_rollout(1)
        trainer = mesh.start_trainer()

        async def watch():
            channel = _client(mesh, coordinator.addr, mesh.client_settings())
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)

            async def status():
                return await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)

            deadline = time.monotonic() + scaled(120)
            while True:  # both attached, work in flight on both (each takes at most 4)
                s = await status()
                if s.num_rollout_servers == 2 and s.num_samples_in_flight > 4 and mesh.metrics():
                    break
                assert time.monotonic() < deadline and trainer.alive(), "never saw both servers busy"
                await asyncio.sleep(0.02)
            os.kill(victim.popen.pid, signal.SIGKILL)
            t0 = time.monotonic()
            while (await status()).num_rollout_servers != 1:
                await asyncio.sleep(0.01)
            reassign = time.monotonic() - t0
            await channel.close()
            return reassign

        reassign_s = asyncio.run(asyncio.wait_for(watch(), scaled(150)))
        assert trainer.popen.wait(timeout=scaled(150)) == 0, trainer.log()[-3000:]
    finally:
        mesh.stop()

    rows = mesh.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["num_samples"] == 16 for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_groups_consumed"] == 16
    # Trained entries are trimmed from the stream once acknowledged, so the ledgers are the record:
    # every group trained once, stored once, each with its 4 samples.
    run_dir = tmp_path / "run"
    trained = [
        g
        for line in (run_dir / "trained.jsonl").read_text().splitlines()
        for g in json.loads(line)["group_ids"]
    ]
    assert len(trained) == len(set(trained)) == 16  # none trained twice, none lost
    stored: dict[str, set[str]] = {}
    for line in (run_dir / "dispatch.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "stored":
            stored.setdefault(event["group_id"], set()).add(event["uid"])
    assert set(trained) <= set(stored) and all(len(uids) == 4 for uids in stored.values())
    r = redis.Redis.from_url(redis_url)
    stream = f"slipstream:{values['run_id']}:groups"
    assert r.xpending(stream, "trainers")["pending"] == 0
    log = mesh.services["coordinator"].log()
    assert "rollout server rollout-1 detached" in log
    print(f"rollout server SIGKILLed: leases released in {reassign_s * 1000:.0f} ms; run completed")
