"""The coordinator's durable state: journaled in Redis, reloaded by a coordinator started again.

Real Redis, real gRPC, a real reward service; the coordinator runs in-process and is stopped
and started again on the same run id. The rollout side is `FakeRollout` (test_coordinator.py).
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
import redis
import test_coordinator
from machine_speed import scaled
from test_coordinator import (
    FakeRollout,
    _aiter,
    _cfg,
    _read_all,
    _refused_push,
    _until,
    _until_stored,
    _weights,
)

from slipstream.buffer.coordinator_store import CoordinatorCounters, CoordinatorStore
from slipstream.buffer.keys import Keys
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc
from slipstream.rpc.channel import aio_channel
from slipstream.services.coordinator.pipeline import EPOCH_BITS
from slipstream.services.coordinator.server import start_coordinator
from slipstream.weights import iter_messages

pytestmark = pytest.mark.timeout(60)
assets, reward_addr = test_coordinator.assets, test_coordinator.reward_addr  # the same fixtures


async def _status(stub) -> coordinator_pb2.CoordinatorStatus:
    return await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)


def _journal(redis_url: str, run_id: str):
    store = CoordinatorStore(redis_url, run_id)
    try:
        return store.load()
    finally:
        store.close()


def test_state_is_journaled_and_a_restarted_coordinator_resumes_it(assets, redis_url, run_id, reward_addr):
    cfg = _cfg(assets, redis_url, run_id, reward_addr)  # 2 groups x 2 samples, then the window is full
    keys = Keys(run_id)
    r = redis.Redis.from_url(redis_url)

    async def first_life() -> dict[str, str]:
        coord = await start_coordinator(cfg)
        channel = aio_channel(f"127.0.0.1:{coord.port}")
        try:
            rollout = FakeRollout(channel, "r0", capacity=8).start()
            items = {i.work_id: i for i in await rollout.work(4)}
            assert sorted(items) == ["p0/0", "p0/1", "p1/0", "p1/1"]
            assert all(i.lease_epoch == 1 for i in items.values())
            for wid in ("p0/0", "p0/1", "p1/0"):  # p0 completes; p1 has one result of two
                rollout.answer(items[wid], items[wid].sample.label)

            async def journaled():
                snap = _journal(redis_url, run_id)
                groups = {g.group_id: g for g in snap.groups} if snap else {}
                return (
                    snap
                    and snap.counters.num_stored == 1
                    and list(groups) == ["p1"]
                    and (list(groups["p1"].results) == [0])
                )

            await _until(journaled, "p0 stored, p1 journaled with its one result")
            # The store was one transaction: p0 is in the buffer and not in assembly, the counter agrees.
            assert r.xlen(keys.groups) == 1 and not r.hexists(keys.assembly, "p0")
            assert int(r.hget(keys.coordinator_state, "num_stored")) == 1
            snap = _journal(redis_url, run_id)
            assert (snap.counters.cursor, snap.counters.incarnation, snap.counters.version) == (2, 0, 0)
            (p1,) = snap.groups
            assert [s.uid for s in p1.samples] == ["p1/0", "p1/1"] and p1.deadline == 2
            assert p1.results[0].response == items["p1/0"].sample.label
            await rollout.close()
        finally:
            await channel.close()
            await coord.stop()
        return {wid: i.sample.label for wid, i in items.items()}

    async def second_life() -> None:
        coord = await start_coordinator(cfg)
        channel = aio_channel(f"127.0.0.1:{coord.port}")
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        try:
            status = await _status(stub)
            assert (status.num_groups_dispatched, status.num_groups_completed) == (2, 1)
            assert status.weights_held  # version 0: the base checkpoint, nothing to hold
            rollout = FakeRollout(channel, "r0", capacity=8).start()
            (item,) = await rollout.work(1)  # only the sample without a result goes out again
            assert item.work_id == "p1/1"
            assert item.lease_epoch == (1 << EPOCH_BITS) + 1  # above every epoch of the first life
            await rollout.nothing_more()  # the cursor was resumed: the window is still full
            rollout.answer(item, item.sample.label, epoch=1)  # an old-incarnation epoch: refused
            await asyncio.sleep(0.3)
            assert (await _status(stub)).num_groups_completed == 1
            rollout.answer(item, item.sample.label)

            await _until_stored(stub, 2, "p1 in the buffer")
            await rollout.close()
        finally:
            await channel.close()
            await coord.stop()

    asyncio.run(asyncio.wait_for(first_life(), scaled(45)))
    asyncio.run(asyncio.wait_for(second_life(), scaled(45)))
    groups = _read_all(redis_url, run_id)
    assert [g.group_id for g in groups] == ["p0", "p1"]
    assert [s.reward for s in groups[1].samples] == [1.0, 1.0]  # the journaled result kept its answer
    assert r.hlen(keys.assembly) == 0 and int(r.hget(keys.coordinator_state, "incarnation")) == 1
    r.close()


def test_a_restarted_coordinator_takes_the_same_version_again_when_it_holds_no_weights(
    assets, redis_url, run_id, reward_addr
):
    cfg = _cfg(assets, redis_url, run_id, reward_addr)
    manifest, chunks = _weights(1)

    async def push(stub) -> int:
        return (await stub.PushWeights(_aiter(iter_messages(manifest, chunks)), timeout=10)).version

    async def life(pushes: int) -> None:
        coord = await start_coordinator(cfg)
        channel = aio_channel(f"127.0.0.1:{coord.port}")
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        try:
            if pushes == 1:  # first life: version 1 pushed and journaled
                assert await push(stub) == 1

                async def journaled():
                    snap = _journal(redis_url, run_id)
                    return snap is not None and snap.counters.version == 1

                await _until(journaled, "version 1 journaled")
                return
            status = await _status(stub)
            assert status.policy_version == 1 and not status.weights_held
            with pytest.raises(grpc.aio.AioRpcError) as e:  # known, not held: nothing to fetch yet
                [
                    m
                    async for m in stub.FetchWeights(
                        coordinator_pb2.FetchWeightsRequest(version=1), timeout=5
                    )
                ]
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert await push(stub) == 1  # the same version is accepted once
            status = await _status(stub)
            assert status.policy_version == 1 and status.weights_held
            with pytest.raises(grpc.RpcError) as e:  # held now: the trainer reads ALREADY_EXISTS
                await _refused_push(coord, iter_messages(manifest, chunks))
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        finally:
            await channel.close()
            await coord.stop()

    asyncio.run(asyncio.wait_for(life(1), scaled(45)))
    asyncio.run(asyncio.wait_for(life(2), scaled(45)))


def test_store_groups_is_one_transaction(redis_url, run_id):
    from slipstream.proto import types_pb2

    store = CoordinatorStore(redis_url, run_id)
    keys = Keys(run_id)
    try:
        store.write(CoordinatorCounters(cursor=2), {"p0": b"record", "p1": b"record"}, [])
        groups = [
            types_pb2.Group(group_id=f"p{i}", samples=[types_pb2.Sample(uid=f"p{i}/0", tokens=[1])])
            for i in range(2)
        ]
        with store.redis.monitor() as monitor:
            entry_ids = store.store_groups(groups)
            commands = []
            deadline = time.monotonic() + 5
            while len(commands) < 7 and time.monotonic() < deadline:
                cmd = monitor.next_command()["command"].split()[0].upper()
                if cmd in ("MULTI", "SET", "XADD", "HDEL", "HINCRBY", "EXEC"):
                    commands.append(cmd)
        assert commands == ["MULTI", "SET", "XADD", "XADD", "HDEL", "HINCRBY", "EXEC"]  # SET: last_stored
        stream = [e.decode() if isinstance(e, bytes) else e for e, _ in store.redis.xrange(keys.groups)]
        assert stream == entry_ids  # in the order given
        assert not store.redis.hlen(keys.assembly)
        assert store.load().counters.num_stored == 2
    finally:
        store.close()


def test_a_store_whose_ledger_lines_a_kill_cut_off_gets_them_at_resume(
    assets, redis_url, run_id, reward_addr, tmp_path
):
    """The `stored` lines follow the store's commit; a coordinator SIGKILLed between the two
    (what tests/chaos/test_chaos_coordinator.py caught once in a fresh-clone run) left a group in
    the buffer that its ledger never called stored. The store keeps its last groups' uids beside
    the commit, and the next coordinator writes their lines, once."""
    from slipstream.proto import types_pb2

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ledger = run_dir / "dispatch.jsonl"
    store = CoordinatorStore(redis_url, run_id)
    try:  # the first life, up to the kill: p0 and p1 dispatched, then p1 stored, its lines not written
        ledger.write_text(
            "".join(f'{{"event": "dispatched", "group_id": "p{i}", "uid": "p{i}/{j}", "t": 1.0}}\n' for i in (0, 1) for j in (0, 1))
            + '{"event": "stored", "group_id": "p0", "uid": "p0/0", "t": 1.0}\n'
            + '{"event": "stored", "group_id": "p0", "uid": "p0/1", "t": 1.0}\n'
        )  # fmt: skip
        store.write(CoordinatorCounters(cursor=2), {}, [])
        store.store_groups(
            [types_pb2.Group(group_id="p0", samples=[types_pb2.Sample(uid="p0/0", tokens=[1])])]
        )
        p1 = [types_pb2.Sample(uid=f"p1/{j}", tokens=[1]) for j in (0, 1)]
        store.store_groups([types_pb2.Group(group_id="p1", samples=p1)])
        assert store.load().last_stored == {"p1": ["p1/0", "p1/1"]}
    finally:
        store.close()
    cfg = _cfg(assets, redis_url, run_id, reward_addr, run_dir=str(run_dir))

    async def life() -> None:
        coord = await start_coordinator(cfg)
        await coord.stop()

    def stored_lines() -> list[tuple[str, str]]:
        rows = [json.loads(line) for line in ledger.read_text().splitlines()]
        return [(r["group_id"], r["uid"]) for r in rows if r["event"] == "stored"]

    asyncio.run(asyncio.wait_for(life(), scaled(45)))
    assert stored_lines() == [("p0", "p0/0"), ("p0", "p0/1"), ("p1", "p1/0"), ("p1", "p1/1")]
    asyncio.run(asyncio.wait_for(life(), scaled(45)))  # a second resume finds nothing missing
    assert len(stored_lines()) == 4
