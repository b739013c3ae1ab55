"""Leases expire without heartbeats, and only then.

- SIGSTOP one of two real rollout servers past a short `--lease-timeout` (keepalive left at its
  production 20 s + 10 s, so the transport is not what notices): the coordinator detaches it and
  its work goes to the other server; after SIGCONT it re-attaches by itself, whatever it was
  generating is refused (its stream is gone, its epochs are old), and nothing is stored twice.
- A slow server that keeps heartbeating keeps its work past the timeout, however long it takes;
  a silent one loses it (the rollout side played by `FakeRollout`, so the timing is the test's).

Printed: time from the SIGSTOP to the leases being released (time to reassign).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import test_coordinator
from chaos_mesh import ChaosMesh, tiny_values, wait_for
from machine_speed import scaled
from test_chaos_coordinator import buffer_group_ids, ledger_rows, status
from test_coordinator import FakeRollout, _cfg, _read_all, _until_stored

from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc
from slipstream.rpc.channel import aio_channel
from slipstream.services.coordinator.server import start_coordinator

assets, reward_addr = test_coordinator.assets, test_coordinator.reward_addr  # the same fixtures
LEASE_S = 1.5
GROUPS = 20


def test_a_frozen_rollout_server_loses_its_leases_and_comes_back(chaos_assets, tmp_path, redis_url):
    model, prompts = chaos_assets
    run_dir = tmp_path / "run"
    values = tiny_values(
        model, prompts, run_dir, redis_url,
        num_rollout=5, max_staleness=4, rollout_max_response_len=32, rollout_max_batch_size=4,
        rollout_temperature=1.0, lease_timeout=LEASE_S,
        # No dispatch before both servers attached: one alone can finish the run before the other
        # is up (both must hold work when one freezes).
        rollout_attach_grace=scaled(60),
    )  # fmt: skip
    mesh = ChaosMesh(run_dir, values)
    try:
        mesh.start_reward()
        mesh.start_coordinator()
        for i in (0, 1):
            mesh.start_rollout(i, wait=False)

        def both_busy():
            s = status(mesh)
            return s and s.num_rollout_servers == 2 and s.num_samples_in_flight > 4  # each holds at most 4

        wait_for(both_busy, 60, "both servers holding work", interval=0.01)
        victim = mesh.services["rollout-1"]
        os.kill(victim.popen.pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            wait_for(lambda: status(mesh).num_rollout_servers == 1, 10, "the frozen server detached", 0.02)
            reassign_s = time.monotonic() - t_stop
            completed = status(mesh).num_groups_completed
            wait_for(
                lambda: status(mesh).num_groups_completed > completed, 10, "progress on the other server"
            )
        finally:
            os.kill(victim.popen.pid, signal.SIGCONT)
        t_cont = time.monotonic()
        wait_for(lambda: status(mesh).num_rollout_servers == 2, 20, "the thawed server re-attached")
        reattach_s = time.monotonic() - t_cont
        wait_for(lambda: status(mesh).num_groups_completed == GROUPS, 60, "every group stored")
        log = mesh.services["coordinator"].log()
    finally:
        mesh.stop()

    assert "rollout server rollout-1 silent for" in log and "--lease-timeout 1.5" in log
    assert reassign_s < LEASE_S + 1.0, reassign_s
    ids = buffer_group_ids(redis_url, values["run_id"])
    assert sorted(ids, key=lambda g: int(g[1:])) == [f"p{i}" for i in range(GROUPS)]  # each once
    stored = [r["uid"] for r in ledger_rows(run_dir) if r["event"] == "stored"]
    assert len(stored) == len(set(stored)) == GROUPS * 4
    print(
        f"rollout server SIGSTOPped holding work: leases released {reassign_s:.2f}s later "
        f"(--lease-timeout {LEASE_S}s), re-attached {reattach_s:.2f}s after SIGCONT; "
        f"{GROUPS}/{GROUPS} groups stored, each once"
    )


@pytest.mark.timeout(60)
def keep_beating(rollout: FakeRollout) -> asyncio.Task:
    """Heartbeats every 0.3 s until cancelled: a live server, as far as its leases go."""

    async def beat() -> None:
        while True:
            rollout.outbox.put_nowait(coordinator_pb2.RolloutEvent(heartbeat=coordinator_pb2.Heartbeat()))
            await asyncio.sleep(0.3)

    return asyncio.create_task(beat())


def test_a_slow_server_that_heartbeats_keeps_its_work_a_silent_one_loses_it(
    assets, redis_url, run_id, reward_addr
):
    cfg = _cfg(assets, redis_url, run_id, reward_addr, rollout_batch_size=1, lease_timeout=1.0)

    async def scenario():
        coord = await start_coordinator(cfg)
        channel = aio_channel(f"127.0.0.1:{coord.port}")
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)

        try:
            slow = FakeRollout(channel, "slow", capacity=4).start()
            beats = [keep_beating(slow)]
            items = await slow.work(2)  # the run's only group
            other = FakeRollout(channel, "other", capacity=4).start()
            beats.append(keep_beating(other))
            # Three lease timeouts of "generation", heartbeating all along (the other one too, so
            # it would be there to take the work if the coordinator wrongly gave up on the slow one).
            await asyncio.sleep(3.0)
            await other.nothing_more(0.1)  # nothing was taken from the slow server
            for item in items:
                slow.answer(item, item.sample.label)

            await _until_stored(stub, 1, "the slow server's group stored")
            for task in beats:
                task.cancel()
            await slow.close()
            await other.close()
        finally:
            await channel.close()
            await coord.stop()

    asyncio.run(asyncio.wait_for(scenario(), scaled(45)))
    (group,) = _read_all(redis_url, run_id)
    assert [s.reward for s in group.samples] == [1.0, 1.0]


@pytest.mark.timeout(60)
def test_a_silent_server_loses_its_work_after_the_lease_timeout(assets, redis_url, run_id, reward_addr):
    cfg = _cfg(assets, redis_url, run_id, reward_addr, rollout_batch_size=1, lease_timeout=1.0)

    async def scenario():
        coord = await start_coordinator(cfg)
        channel = aio_channel(f"127.0.0.1:{coord.port}")
        try:
            silent = FakeRollout(channel, "silent", capacity=4).start()
            first = await silent.work(2)
            other = FakeRollout(channel, "other", capacity=4).start()
            beating = keep_beating(other)  # alive however loaded the box: only the silent one lapses
            t0 = time.monotonic()
            again = await other.work(2)  # moved once the silent server's lease lapsed
            moved_s = time.monotonic() - t0
            assert sorted(i.work_id for i in again) == sorted(i.work_id for i in first)
            assert all(i.lease_epoch == 2 for i in again)
            # After the 1 s lease (checked about every second), not at once; the upper bound only
            # says "the lease did it" and leaves room for a loaded 2-core CI box.
            assert 0.5 < moved_s < 6.0, moved_s
            for item in first:  # the silent one wakes up: its answers are refused
                silent.answer(item, "late")
            for item in again:
                other.answer(item, item.sample.label)

            await _until_stored(
                coordinator_pb2_grpc.CoordinatorStub(channel), 1, "the group stored from the other server"
            )
            beating.cancel()
            await other.close()
        finally:
            await channel.close()
            await coord.stop()

    asyncio.run(asyncio.wait_for(scenario(), scaled(45)))
    (group,) = _read_all(redis_url, run_id)
    assert [s.reward for s in group.samples] == [1.0, 1.0]  # the answers of the live lease, not "late"
