"""A sample whose reward keeps failing is dead-lettered; its group is still stored, the run goes on.

A real reward service (in-process, real gRPC) runs a custom reward function that raises for one
prompt; the coordinator scores, retries that prompt's samples up to `--reward-max-failures`
attempts in total, then writes each to the dead-letter stream with the reason and stores the
group with those samples FAILED (never trained on).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import test_coordinator
from machine_speed import scaled
from test_coordinator import FakeRollout, _cfg, _read_all, _until_stored

from slipstream.buffer.replay import ReplayBuffer
from slipstream.config import config_from_values
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from slipstream.rpc.channel import aio_channel
from slipstream.services.coordinator.server import start_coordinator
from slipstream.services.reward.server import start_reward_server

pytestmark = pytest.mark.timeout(60)
assets = test_coordinator.assets  # the same fixture

REWARD_FN = """
CALLS = {}

def picky(args, sample):
    CALLS[sample.prompt] = CALLS.get(sample.prompt, 0) + 1
    if sample.prompt == "1+1=":
        raise RuntimeError("this grader cannot read " + sample.prompt)
    return 1.0
"""


def test_reward_failing_n_times_is_dead_lettered_and_the_group_still_stored(
    assets, redis_url, run_id, tmp_path
):
    fn = tmp_path / "picky.py"
    fn.write_text(REWARD_FN)
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    async def scenario():
        reward, _ = await start_reward_server(
            config_from_values({"custom_rm_path": f"{fn}:picky", "port": 0})
        )
        cfg = _cfg(
            assets, redis_url, run_id, f"127.0.0.1:{reward.port}",
            reward_max_failures=3, run_dir=str(run_dir),
        )  # fmt: skip
        coord = await start_coordinator(cfg)
        channel = aio_channel(f"127.0.0.1:{coord.port}")
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        try:
            rollout = FakeRollout(channel, "r0", capacity=8).start()
            for item in await rollout.work(4):  # p0 is "0+1=", p1 is "1+1=" (the one that fails)
                rollout.answer(item, item.sample.label)

            await _until_stored(stub, 2, "both groups stored")
            status = await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)
            assert status.num_reward_failures == 2  # the two samples of p1
            await rollout.close()
        finally:
            await channel.close()
            await coord.stop()
            await reward.stop(0.5)

    asyncio.run(asyncio.wait_for(scenario(), scaled(45)))
    groups = {g.group_id: g for g in _read_all(redis_url, run_id)}
    assert [s.status for s in groups["p1"].samples] == [types_pb2.SAMPLE_STATUS_FAILED] * 2
    assert [s.reward for s in groups["p0"].samples] == [1.0, 1.0]
    buffer = ReplayBuffer(redis_url, run_id)
    try:
        letters = buffer.dead_letters()
    finally:
        buffer.close()
    assert sorted(row["entry_id"] for _, row in letters) == ["p1/0", "p1/1"]
    for _, row in letters:
        assert row["source"] == "reward"
        assert row["reason"].startswith("reward failed 3 times:") and "cannot read 1+1=" in row["reason"]
        sample = types_pb2.Sample()
        sample.ParseFromString(row["payload"])  # the sample itself, for whoever inspects it
        assert sample.uid == row["entry_id"] and sample.prompt == "1+1="
    rows = [json.loads(line) for line in (run_dir / "dispatch.jsonl").read_text().splitlines()]
    events = [(r["event"], r.get("uid")) for r in rows]
    assert sum(e == ("reward_failed", "p1/0") for e in events) == 3
    assert ("dead_lettered", "p1/0") in events and ("dead_lettered", "p1/1") in events
    assert {u for e, u in events if e == "stored"} == {"p0/0", "p0/1", "p1/0", "p1/1"}
