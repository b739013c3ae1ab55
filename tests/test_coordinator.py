"""The coordinator: the ledger's leases, the weight relay's checks,
and the service itself on port 0 over real gRPC with a real Redis and a real reward service.

The rollout side of the Attach protocol is played by `FakeRollout`, a test-side peer that
speaks the stream (Hello, results, WeightsApplied) and lets the test decide what comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from machine_speed import scaled

from mesh_fixtures import push_like_the_trainer
from slipstream.buffer.replay import ReplayBuffer
from slipstream.config import config_from_values
from slipstream.demo.tokenizer import build_char_tokenizer
from slipstream.models.hf import load_tokenizer
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from slipstream.rpc import bursts
from slipstream.rpc.channel import aio_channel, sync_channel
from slipstream.services.coordinator.groups import Ledger, Slots, StaleResult, pick_server
from slipstream.services.coordinator.server import start_coordinator
from slipstream.services.coordinator.weights_relay import PushError, VersionNotNewer, receive_push
from slipstream.weights import WeightStager, iter_messages, pack

pytestmark = pytest.mark.timeout(60)
STEP = scaled(10.0)  # seconds any single expected event may take (on an idle 2-core box: 10)


# ---- the ledger ----------------------------------------------------------------------------


def _group(gid: str, n: int) -> list[types_pb2.Sample]:
    return [types_pb2.Sample(uid=f"{gid}/{i}", index=i, tokens=[1, 2]) for i in range(n)]


def test_pick_server_least_loaded_whole_group_or_split_when_it_can_never_fit():
    slots = {"a": Slots(3, 8), "b": Slots(1, 8), "c": Slots(0, 2)}
    assert pick_server(4, slots) == ("b", 4)  # c is emptier but cannot hold the whole group
    assert pick_server(8, slots) is None  # b could hold it later: wait, do not split
    small = {"a": Slots(1, 3), "b": Slots(0, 3)}
    assert pick_server(5, small) == ("b", 3)  # no server can ever hold 5: split


def test_ledger_leases_release_and_stale_epochs():
    ledger = Ledger()
    ledger.add_group("p0", _group("p0", 2))
    slots = {"a#1": Slots(0, 4), "b#2": Slots(1, 4)}
    first = ledger.place_next(slots)
    assert [(a.conn_id, a.work_id, a.epoch) for a in first] == [("a#1", "p0/0", 1), ("a#1", "p0/1", 1)]
    assert ledger.place_next(slots) == []
    assert (ledger.in_flight("a#1"), ledger.in_flight("b#2")) == (2, 0)
    # a's stream ends: both samples go back to the queue and out again with epoch 2
    assert ledger.release("a#1") == 2
    again = ledger.place_next({"b#2": Slots(1, 4)})
    assert [(a.conn_id, a.epoch) for a in again] == [("b#2", 2), ("b#2", 2)]
    done = types_pb2.Sample(uid="p0/0", tokens=[1, 2, 3], response_length=1)
    with pytest.raises(StaleResult):
        ledger.accept_result("b#2", "p0/0", 1, done)  # the old epoch
    with pytest.raises(StaleResult):
        ledger.accept_result("b#2", "nope/0", 2, done)  # unknown work id
    assert ledger.accept_result("b#2", "p0/0", 2, done) is None
    with pytest.raises(StaleResult):
        ledger.accept_result("b#2", "p0/0", 2, done)  # already done
    group = ledger.accept_result(
        "b#2", "p0/1", 2, types_pb2.Sample(uid="p0/1", tokens=[1, 2, 4], response_length=1)
    )
    assert group is not None and [s.tokens[-1] for s in group.finished_samples()] == [3, 4]
    assert not ledger.groups and not ledger.leases
    assert (ledger.in_flight("a#1"), ledger.in_flight("b#2")) == (0, 0)


def test_aborted_result_is_requeued_as_a_continuation():
    ledger = Ledger()
    ledger.add_group("p0", _group("p0", 1))
    (a,) = ledger.place_next({"s#1": Slots(0, 4)})
    partial = types_pb2.Sample(
        uid="p0/0", tokens=[1, 2, 9], response_length=1, status=types_pb2.SAMPLE_STATUS_ABORTED
    )
    assert ledger.accept_result("s#1", "p0/0", a.epoch, partial) is None
    # parked (on its way to the partial stream): nothing to place until it is resumed
    assert ledger.parked == {"p0/0"} and ledger.place_next({"s#1": Slots(0, 4)}) == []
    assert list(ledger.sample_of("p0/0").tokens) == [1, 2, 9]
    assert not ledger.resume(types_pb2.Sample(uid="p9/0"))  # nobody waits for that one
    assert ledger.resume(partial)
    (b,) = ledger.place_next({"s#1": Slots(0, 4)})
    assert list(b.sample.tokens) == [1, 2, 9] and b.sample.response_length == 1 and b.epoch == 2
    assert b.continued and b.sample.status == types_pb2.SAMPLE_STATUS_PENDING


# ---- the weight relay's checks -------------------------------------------------------------


def _weights(version: int):
    import torch

    g = torch.Generator().manual_seed(version)
    state = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(256, 64, generator=g),
        "model.norm.weight": torch.ones(64),
    }
    return pack(state, version, "fp8", chunk_bytes=4096)


async def _aiter(messages):
    for m in messages:
        yield m


def test_receive_push_checks_order_count_and_version():
    manifest, chunks = _weights(3)
    msgs = list(iter_messages(manifest, chunks))
    assert len(chunks) > 2
    stored = asyncio.run(receive_push(_aiter(msgs), current_version=2))
    assert stored.version == 3 and [m.SerializeToString() for m in stored.messages] == [
        m.SerializeToString() for m in msgs
    ]

    def refused(messages, current=0) -> PushError:
        with pytest.raises(PushError) as e:
            asyncio.run(receive_push(_aiter(messages), current))
        return e.value

    not_newer = refused(msgs, current=3)
    assert isinstance(not_newer, VersionNotNewer) and "not newer" in str(not_newer)
    assert not isinstance(refused(msgs[1:]), VersionNotNewer)  # other refusals stay plain PushError
    assert "manifest" in str(refused(msgs[1:]))
    assert "out of order" in str(refused([msgs[0], msgs[2], msgs[1], *msgs[3:]]))
    assert "chunks" in str(refused(msgs[:-1]))
    # A damaged chunk is refused before the version is committed (held as the latest, it would
    # block every good push of that version: chaos test_auth_malformed_oversized_and_broken_weights).
    bad = types_pb2.WeightMessage()
    bad.CopyFrom(msgs[1])
    bad.chunk.data = b"x" + bad.chunk.data[1:]
    assert "chunk 0 fails its sha256 check" in str(refused([msgs[0], bad, *msgs[2:]], current=2))


# ---- the service over real gRPC ------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("coord")
    build_char_tokenizer(d / "model")
    prompts = d / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "label": str(i + 1)}) + "\n" for i in range(8))
    )
    return d


@pytest.fixture(scope="module")
def reward_addr(assets):
    """A real reward service (math rule) as its own process."""
    ready = assets / "reward.port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slipstream.services.reward",
            "--rm-type",
            "math",
            "--port",
            "0",
            "--ready-file",
            str(ready),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + scaled(30)
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"reward service did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    yield f"127.0.0.1:{ready.read_text().strip()}"
    proc.terminate()
    proc.wait(10)


def _cfg(assets: Path, redis_url: str, run_id: str, reward_addr: str, **rollout):
    values = dict(
        hf_checkpoint=str(assets / "model"),
        prompt_data=str(assets / "prompts.jsonl"),
        redis_url=redis_url,
        run_id=run_id,
        reward_addr=reward_addr,
        rm_type="math",
        rollout_batch_size=2,
        n_samples_per_prompt=2,
        num_rollout=1,
        max_staleness=0,
        rollout_max_response_len=8,
        rollout_temperature=1.0,
        seed=7,
        micro_batch_size=1,
    )
    values.update(rollout)
    return config_from_values(values)


class FakeRollout:
    """A rollout server as the coordinator sees it: a peer on the Attach stream."""

    def __init__(self, channel: grpc.aio.Channel, server_id: str, capacity: int, version: int = 0):
        self.stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        self.server_id = server_id
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.commands: asyncio.Queue = asyncio.Queue()
        self.items: list[coordinator_pb2.WorkItem] = []  # work received and not yet taken by `work`
        self.outbox.put_nowait(
            coordinator_pb2.RolloutEvent(
                hello=coordinator_pb2.Hello(
                    server_id=server_id, policy_version=version, max_concurrent_samples=capacity
                )
            )
        )

    async def _events(self):
        # As the rollout server writes them: answers queued together go as one ResultBatch.
        async for event in bursts.coalesced(self.outbox, "result", "results"):
            yield event

    async def _read(self) -> None:
        async for cmd in self.call:
            await self.commands.put(cmd)

    def start(self) -> FakeRollout:
        self.call = self.stub.Attach(self._events())
        self.reader = asyncio.create_task(self._read())
        return self

    async def next(self, kind: str):
        """The next command of this kind (others of a different kind are skipped)."""
        while True:
            cmd = await asyncio.wait_for(self.commands.get(), STEP)
            if cmd.WhichOneof("kind") == kind:
                return getattr(cmd, kind)

    async def work(self, count: int) -> list[coordinator_pb2.WorkItem]:
        """The next `count` work items, whether they came one a message or in a `WorkBatch`."""
        while len(self.items) < count:
            cmd = await asyncio.wait_for(self.commands.get(), STEP)
            if cmd.WhichOneof("kind") in ("work", "work_batch"):
                self.items += bursts.items(cmd, "work", "work_batch")
        items, self.items = self.items[:count], self.items[count:]
        return items

    async def nothing_more(self, seconds: float = 0.5) -> None:
        await asyncio.sleep(seconds)
        assert not self.items, f"unexpected work: {self.items[0]}"
        assert self.commands.empty(), f"unexpected command: {self.commands.get_nowait()}"

    def answer(self, item: coordinator_pb2.WorkItem, text: str, epoch: int | None = None) -> None:
        sample = types_pb2.Sample()
        sample.CopyFrom(item.sample)
        response = [ord(c) % 16 for c in text] + [0]  # the coordinator never decodes: any ids do
        sample.tokens.extend(response)
        sample.response_length += len(response)  # a continued sample keeps its earlier part
        sample.response = text
        sample.rollout_log_probs.extend([-0.5] * len(response))
        sample.policy_versions.extend([0] * len(response))
        sample.loss_mask.extend([1] * len(response))
        sample.status = types_pb2.SAMPLE_STATUS_COMPLETED
        self.outbox.put_nowait(
            coordinator_pb2.RolloutEvent(
                result=coordinator_pb2.SampleResult(
                    work_id=item.work_id,
                    lease_epoch=item.lease_epoch if epoch is None else epoch,
                    sample=sample,
                )
            )
        )

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        await asyncio.wait_for(self.reader, STEP)


async def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + STEP
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _until_stored(stub: coordinator_pb2_grpc.CoordinatorStub, count: int, what: str) -> None:
    """Wait until the coordinator reports `count` groups in the buffer."""

    async def stored() -> bool:
        status = await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)
        return status.num_groups_completed == count

    await _until(stored, what)


@contextlib.asynccontextmanager
async def _coordinator(cfg):
    """A coordinator on a free port, one client channel to it and its stub; stopped on exit."""
    coord = await start_coordinator(cfg)
    channel = aio_channel(f"127.0.0.1:{coord.port}")
    try:
        yield coord, channel, coordinator_pb2_grpc.CoordinatorStub(channel)
    finally:
        await channel.close()
        await coord.stop()


async def _refused_push(coord, messages) -> None:
    """A push expected to be refused, made as the trainer makes it (`push_like_the_trainer`)."""
    with sync_channel(f"127.0.0.1:{coord.port}") as channel:
        await asyncio.to_thread(push_like_the_trainer, channel, messages)


def _read_all(redis_url: str, run_id: str) -> list[types_pb2.Group]:
    buffer = ReplayBuffer(redis_url, run_id)
    try:
        return [g for _, g in buffer.read_groups("test", count=100, block_ms=0)]
    finally:
        buffer.close()


def test_groups_are_scored_and_land_in_the_buffer(assets, redis_url, run_id, reward_addr):
    cfg = _cfg(assets, redis_url, run_id, reward_addr)
    tokenizer = load_tokenizer(assets / "model")

    async def scenario():
        async with _coordinator(cfg) as (coord, channel, stub):
            rollout = FakeRollout(channel, "r0", capacity=8).start()
            # max_staleness 0, nothing trained: exactly one batch (2 groups x 2 samples) goes out
            items = await rollout.work(4)
            await rollout.nothing_more()
            by_group: dict[str, list] = {}
            for item in items:
                by_group.setdefault(item.work_id.split("/")[0], []).append(item)
                assert (
                    list(item.sample.tokens)
                    == tokenizer(item.sample.prompt, add_special_tokens=False)["input_ids"]
                )
                assert item.sampling.max_new_tokens == 8 and item.sampling.temperature == 1.0
                assert item.sample.uid == item.work_id and item.lease_epoch == 1
            assert len(by_group) == 2 and all(len(v) == 2 for v in by_group.values())
            assert len({i.sampling.seed for i in items}) == 4  # distinct seeds per sample
            for item in items:  # index 0 answers right, index 1 wrong
                label = item.sample.label
                rollout.answer(item, label if item.sample.index == 0 else label + "7")

            await _until_stored(stub, 2, "2 groups in the buffer")
            status = await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)
            assert status.num_groups_dispatched == 2 and status.num_samples_in_flight == 0
            assert status.num_rollout_servers == 1 and dict(status.server_versions) == {"r0": 0}
            assert status.num_reward_failures == 0
            # The trainer finishing a step would open room, but num_rollout x batch = 2 groups is the run
            progress = await stub.ReportProgress(
                coordinator_pb2.TrainerProgress(step=1, finished=True), timeout=5
            )
            assert progress.finished
            await rollout.nothing_more()
            await rollout.close()

    asyncio.run(asyncio.wait_for(scenario(), scaled(45)))
    groups = _read_all(redis_url, run_id)
    assert len(groups) == 2
    for group in groups:
        assert [s.index for s in group.samples] == [0, 1]
        assert [s.reward for s in group.samples] == [1.0, 0.0]
        assert all(s.status == types_pb2.SAMPLE_STATUS_COMPLETED for s in group.samples)
        assert all(
            len(s.rollout_log_probs) == s.response_length == len(s.policy_versions) for s in group.samples
        )
        assert group.group_id == group.samples[0].uid.split("/")[0]


def test_dropped_stream_is_redispatched_and_stale_epochs_ignored(assets, redis_url, run_id, reward_addr):
    cfg = _cfg(assets, redis_url, run_id, reward_addr, rollout_batch_size=1)

    async def scenario():
        async with _coordinator(cfg) as (coord, channel, stub):
            a = FakeRollout(channel, "a", capacity=4).start()
            first = await a.work(2)  # the run's only group
            b = FakeRollout(channel, "b", capacity=4).start()
            await b.nothing_more(0.3)
            await a.close()  # a goes away without answering
            again = await b.work(2)
            assert sorted(i.work_id for i in again) == sorted(i.work_id for i in first)
            assert all(i.lease_epoch == 2 for i in again)
            for item in again:  # a late answer under the old lease is ignored
                b.answer(item, item.sample.label, epoch=1)
            await asyncio.sleep(0.3)
            status = await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)
            assert status.num_groups_completed == 0 and status.num_samples_in_flight == 2
            for item in again:
                b.answer(item, item.sample.label)

            await _until_stored(stub, 1, "the re-dispatched group in the buffer")
            await b.close()

    asyncio.run(asyncio.wait_for(scenario(), scaled(45)))
    (group,) = _read_all(redis_url, run_id)
    assert [s.reward for s in group.samples] == [1.0, 1.0]


def test_push_and_fetch_weights_round_trip_and_refusals(assets, redis_url, run_id, reward_addr):
    cfg = _cfg(assets, redis_url, run_id, reward_addr)
    manifest, chunks = _weights(1)
    pushed = [m.SerializeToString() for m in iter_messages(manifest, chunks)]

    async def scenario():
        async with _coordinator(cfg) as (coord, channel, stub):
            rollout = FakeRollout(channel, "r0", capacity=2).start()

            async def attached():
                return (
                    await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)
                ).num_rollout_servers == 1

            await _until(attached, "the rollout server to attach")
            reply = await stub.PushWeights(_aiter(iter_messages(manifest, chunks)), timeout=10)
            assert reply.version == 1 and reply.num_servers_notified == 1
            notice = await rollout.next("new_weights")
            assert notice.version == 1
            for version in (0, 1):
                got = [
                    m.SerializeToString()
                    async for m in stub.FetchWeights(
                        coordinator_pb2.FetchWeightsRequest(version=version), timeout=10
                    )
                ]
                assert got == pushed  # relayed byte for byte
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [
                    m
                    async for m in stub.FetchWeights(
                        coordinator_pb2.FetchWeightsRequest(version=7), timeout=10
                    )
                ]
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e:  # the same version again: already held
                await _refused_push(coord, iter_messages(manifest, chunks))
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "not newer" in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:  # a stream must open with Hello
                no_hello = _aiter([coordinator_pb2.RolloutEvent(heartbeat=coordinator_pb2.Heartbeat())])
                [c async for c in stub.Attach(no_hello, timeout=10)]
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            rollout.outbox.put_nowait(
                coordinator_pb2.RolloutEvent(
                    weights_applied=coordinator_pb2.WeightsApplied(version=1, ok=True, seconds=0.1)
                )
            )

            async def applied():
                status = await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)
                return dict(status.server_versions) == {"r0": 1} and status.policy_version == 1

            await _until(applied, "the server's version to reach 1")
            await rollout.close()

    asyncio.run(asyncio.wait_for(scenario(), scaled(45)))


class _Feed:
    """A push stream the test releases message by message (a push in flight)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def send(self, *messages) -> None:
        for m in messages:
            self.queue.put_nowait(m)

    def end(self) -> None:
        self.queue.put_nowait(None)

    async def stream(self):
        while (m := await self.queue.get()) is not None:
            yield m


async def _next_message(call, what: str):
    return await asyncio.wait_for(call.read(), STEP)


def test_a_fetch_that_starts_mid_push_streams_the_whole_version(assets, redis_url, run_id, reward_addr):
    # Cut-through: servers are told of a version once its manifest passed, fetch it while it
    # arrives, and their stream ends only once the push landed.
    cfg = _cfg(assets, redis_url, run_id, reward_addr)
    manifest, chunks = _weights(1)
    msgs = list(iter_messages(manifest, chunks))

    async def scenario():
        async with _coordinator(cfg) as (coord, channel, stub):
            rollout = FakeRollout(channel, "r0", capacity=2).start()
            await _until(lambda: _attached(stub, 1), "the rollout server to attach")
            feed = _Feed()
            push = asyncio.ensure_future(stub.PushWeights(feed.stream(), timeout=STEP * 2))
            feed.send(msgs[0], msgs[1])
            notice = await rollout.next("new_weights")  # announced with the push still open
            assert notice.version == 1 and not push.done()
            fetch = stub.FetchWeights(coordinator_pb2.FetchWeightsRequest(version=1), timeout=STEP * 2)
            got = [await _next_message(fetch, "manifest"), await _next_message(fetch, "chunk 0")]
            assert got == msgs[:2] and not push.done()
            status = await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)
            assert status.policy_version == 0  # not landed yet
            feed.send(*msgs[2:])
            feed.end()
            while (m := await _next_message(fetch, "the rest")) is not grpc.aio.EOF:
                got.append(m)
            assert [m.SerializeToString() for m in got] == [m.SerializeToString() for m in msgs]
            reply = await push
            assert reply.version == 1 and reply.num_servers_notified == 1
            await rollout.nothing_more(0.3)  # one notice per server, not a second at commit
            stager = WeightStager(
                {"model.layers.0.mlp.up_proj.weight": (256, 64), "model.norm.weight": (64,)}, 0
            )
            for m in got:
                stager.add(m)
            assert stager.finish()[0] == 1
            await rollout.close()

    asyncio.run(asyncio.wait_for(scenario(), scaled(45)))


async def _attached(stub, count: int) -> bool:
    status = await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)
    return status.num_rollout_servers == count


@pytest.mark.parametrize("how", ["cut", "out-of-order"])
def test_a_push_that_fails_midway_fails_its_fetchers_and_the_old_version_stays(
    how, assets, redis_url, run_id, reward_addr
):
    cfg = _cfg(assets, redis_url, run_id, reward_addr)
    old = list(iter_messages(*_weights(1)))
    new = list(iter_messages(*_weights(2)))

    async def scenario():
        async with _coordinator(cfg) as (coord, channel, stub):
            await stub.PushWeights(_aiter(old), timeout=STEP)
            feed = _Feed()
            trainer = aio_channel(f"127.0.0.1:{coord.port}")  # its own connection, to cut
            push = coordinator_pb2_grpc.CoordinatorStub(trainer).PushWeights(feed.stream(), timeout=STEP * 2)
            pushing = asyncio.ensure_future(push)
            feed.send(new[0], new[1])

            async def streaming():
                try:
                    call = stub.FetchWeights(coordinator_pb2.FetchWeightsRequest(version=2), timeout=STEP)
                    return await call.read(), call
                except grpc.aio.AioRpcError:
                    return None, None

            first, fetch = None, None
            deadline = time.monotonic() + STEP
            while first is None:  # NOT_FOUND until the relay read the manifest
                assert time.monotonic() < deadline
                first, fetch = await streaming()
            assert first == new[0]
            assert await _next_message(fetch, "chunk 0") == new[1]
            if how == "cut":
                await trainer.close()  # the trainer's connection breaks off mid-push
            else:
                feed.send(new[3])  # chunk 2 skipped; nothing after it: no write in flight below
            with pytest.raises(grpc.aio.AioRpcError) as e:
                while await _next_message(fetch, "an error") is not grpc.aio.EOF:
                    pass
            assert e.value.code() == grpc.StatusCode.ABORTED
            assert "version 2" in e.value.details()
            if how == "out-of-order":
                assert "out of order" in e.value.details()
                feed.end()  # (a refusal racing a write reads INTERNAL on grpc.aio: push_like_the_trainer)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await pushing
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)
            assert status.policy_version == 1 and status.weights_held
            with pytest.raises(grpc.aio.AioRpcError) as e:  # the failed version is not fetchable
                [
                    m
                    async for m in stub.FetchWeights(
                        coordinator_pb2.FetchWeightsRequest(version=2), timeout=5
                    )
                ]
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            got = [
                m async for m in stub.FetchWeights(coordinator_pb2.FetchWeightsRequest(version=0), timeout=5)
            ]
            assert [m.SerializeToString() for m in got] == [m.SerializeToString() for m in old]
            await trainer.close()
            # The same version pushed again whole lands (the trainer's retry).
            assert (await stub.PushWeights(_aiter(new), timeout=STEP)).version == 2

    asyncio.run(asyncio.wait_for(scenario(), scaled(45)))


def _partial(item: coordinator_pb2.WorkItem, new_tokens: list[int]) -> coordinator_pb2.RolloutEvent:
    """An ABORTED result: what a server returns for an item it was told to abort."""
    sample = types_pb2.Sample()
    sample.CopyFrom(item.sample)
    sample.tokens.extend(new_tokens)
    sample.response_length += len(new_tokens)
    sample.rollout_log_probs.extend([-0.5] * len(new_tokens))
    sample.policy_versions.extend([0] * len(new_tokens))
    sample.loss_mask.extend([1] * len(new_tokens))  # as the real server's finish_sample does
    sample.status = types_pb2.SAMPLE_STATUS_ABORTED
    return coordinator_pb2.RolloutEvent(
        result=coordinator_pb2.SampleResult(work_id=item.work_id, lease_epoch=item.lease_epoch, sample=sample)
    )


def test_over_sampling_fills_the_batch_with_passing_groups_and_recycles_the_rest(
    assets, redis_url, run_id, reward_addr
):
    # one group per step, three dispatched; a group whose rewards all agree is filtered
    cfg = _cfg(
        assets,
        redis_url,
        run_id,
        reward_addr,
        rollout_batch_size=1,
        over_sampling_batch_size=3,
        num_rollout=2,
        dynamic_sampling_filter_path="slipstream.rollout_filters:check_reward_nonzero_std",
    )
    manifest, chunks = _weights(1)

    async def scenario():
        async with _coordinator(cfg) as (coord, channel, stub):
            buffer = ReplayBuffer(redis_url, run_id)

            async def status():
                return await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)

            def by_group(items):
                out: dict[str, list] = {}
                for item in items:
                    out.setdefault(item.work_id.split("/")[0], []).append(item)
                return out

            try:
                rollout = FakeRollout(channel, "r0", capacity=16).start()
                groups = by_group(await rollout.work(6))  # over-sampled: 3 groups go out, not 1
                await rollout.nothing_more(0.3)
                assert sorted(groups) == ["p0", "p1", "p2"]
                for item in groups["p0"]:  # both right: all rewards agree -> filtered
                    rollout.answer(item, item.sample.label)

                async def filtered():
                    return (await status()).num_groups_filtered == 1

                await _until(filtered, "p0 to be filtered")
                groups.update(by_group(await rollout.work(2)))  # another prompt takes its place
                for item in groups["p1"]:  # one right, one wrong: passes, and completes the batch
                    rollout.answer(item, item.sample.label if item.sample.index == 0 else "x")
                abort = await rollout.next("abort")  # the rest still running is recycled
                assert sorted(abort.work_ids) == sorted(i.work_id for g in ("p2", "p3") for i in groups[g])
                for g in ("p2", "p3"):
                    for item in groups[g]:
                        rollout.outbox.put_nowait(_partial(item, [5, 6]))

                async def parked():
                    s = await status()
                    return s.num_partials_recycled == 4 and buffer.partials.count() == 4

                await _until(parked, "4 partials in the Redis partial stream")
                await rollout.nothing_more(0.3)  # the batch is full: nothing new until the next version
                s = await status()
                assert (s.num_groups_completed, s.num_groups_filtered) == (1, 1)

                await stub.PushWeights(_aiter(iter_messages(manifest, chunks)), timeout=10)
                again = await rollout.work(4)  # the partials come back first, to be continued
                assert sorted(i.work_id for i in again) == sorted(abort.work_ids)
                for item in again:
                    assert item.sample.response_length == 2 and list(item.sample.tokens)[-2:] == [5, 6]
                    assert item.min_policy_version == 1  # continued under the new weights
                    assert item.sampling.max_new_tokens == 8 - 2  # what is left of the budget
                assert buffer.partials.count() == 0
                for item in again:
                    rollout.answer(item, item.sample.label if item.sample.index == 0 else "x")

                async def done():
                    return (await status()).num_groups_completed == 2

                await _until(done, "the second batch in the buffer")
                await rollout.close()
            finally:
                buffer.close()

    asyncio.run(asyncio.wait_for(scenario(), scaled(45)))
    stored = _read_all(redis_url, run_id)
    # p1 filled the first batch; the first recycled group to finish fills the second
    assert stored[0].group_id == "p1" and stored[1].group_id in ("p2", "p3") and len(stored) == 2
    for sample in stored[1].samples:  # the continued one: the partial's tokens, then the rest
        assert list(sample.tokens)[-sample.response_length :][:2] == [5, 6]


def test_rollout_idle_fraction_from_heartbeats(assets, redis_url, run_id, reward_addr):
    cfg = _cfg(assets, redis_url, run_id, reward_addr)

    async def scenario():
        async with _coordinator(cfg) as (coord, channel, stub):
            rollout = FakeRollout(channel, "r0", capacity=8).start()

            def beat(idle: float, up: float) -> None:
                rollout.outbox.put_nowait(
                    coordinator_pb2.RolloutEvent(
                        heartbeat=coordinator_pb2.Heartbeat(idle_seconds=idle, uptime_seconds=up)
                    )
                )

            beat(100.0, 120.0)  # the first heartbeat is the baseline: earlier idling does not count
            beat(103.0, 124.0)  # then 3 s idle out of 4
            await asyncio.sleep(0.3)
            status = await stub.ReportProgress(coordinator_pb2.TrainerProgress(step=1), timeout=5)
            assert status.rollout_idle_fraction == pytest.approx(0.75)
            beat(103.0, 126.0)  # busy for the next 2 s: the fraction is per report window
            await asyncio.sleep(0.3)
            status = await stub.ReportProgress(coordinator_pb2.TrainerProgress(step=2), timeout=5)
            assert status.rollout_idle_fraction == pytest.approx(0.0)
            await rollout.close()

    asyncio.run(asyncio.wait_for(scenario(), scaled(45)))


def test_malformed_prompt_file_exits_2_with_one_line(assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "label": "2"}\n{"prompt": oops}\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slipstream.services.coordinator",
            "--hf-checkpoint",
            str(assets / "model"),
            "--prompt-data",
            str(bad),
            "--redis-url",  # required (nothing listens there: the prompts fail first)
            "redis://127.0.0.1:1/0",
            "--reward-addr",
            "127.0.0.1:1",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=scaled(30),
    )
    assert proc.returncode == 2
    assert f"{bad}:2: malformed JSON" in proc.stderr.strip().splitlines()[-1]


def test_prompt_longer_than_the_limit_is_refused_naming_the_record(assets):
    from slipstream.data import DataError, load_prompts
    from slipstream.services.coordinator.prompts import tokenize_prompts

    cfg = config_from_values({"prompt_data": str(assets / "prompts.jsonl"), "rollout_max_prompt_len": 3})
    records = load_prompts(cfg.data.prompt_data)
    with pytest.raises(
        DataError,
        match=r"prompts.jsonl: record 1: prompt is 4 tokens, longer than --rollout-max-prompt-len 3",
    ):
        tokenize_prompts(
            load_tokenizer(assets / "model"), records, cfg.data, cfg.rollout.rollout_max_prompt_len
        )
