"""SIGKILL the coordinator mid-generation and start it again on the same port.

A mesh of real processes (reward, coordinator, 2 rollout servers, the session's Redis) and no
trainer: at version 0 the coordinator admits groups up to the staleness window (20 here) and
stops. The coordinator is killed while groups are being generated, with some already stored;
a new coordinator process on the same port resumes from its journal in Redis, the rollout
servers re-attach by themselves, and at the end the buffer holds exactly p0..p19, each once,
and the dispatch ledger accounts for every dispatched sample.

Printed: time from the kill to the new coordinator serving, to both servers re-attached, and to
the first group stored after the restart (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import signal
import time

import redis
from chaos_mesh import ChaosMesh, tiny_values, wait_for
from machine_speed import scaled

from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from slipstream.rpc import security
from slipstream.rpc.channel import sync_channel

GROUPS = 20  # num_rollout 5 x rollout_batch_size 4; max_staleness 4 lets all of them out at version 0


def status(mesh: ChaosMesh) -> coordinator_pb2.CoordinatorStatus | None:
    """The coordinator's status, or None while it does not answer."""
    previous = security.use(mesh.client_settings())
    try:
        with sync_channel(mesh.services["coordinator"].addr) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            try:
                return stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=2)
            except Exception:  # noqa: BLE001 - down or starting: the caller polls
                return None
    finally:
        security.use(previous)


def buffer_group_ids(redis_url: str, run_id: str) -> list[str]:
    r = redis.Redis.from_url(redis_url)
    ids = []
    for _, fields in r.xrange(f"slipstream:{run_id}:groups"):
        group = types_pb2.Group()
        group.ParseFromString(fields[b"p"])
        ids.append(group.group_id)
    r.close()
    return ids


def ledger_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "dispatch.jsonl").read_text().splitlines()]


def test_coordinator_sigkilled_mid_generation_resumes(chaos_assets, tmp_path, redis_url):
    model, prompts = chaos_assets
    run_dir = tmp_path / "run"
    values = tiny_values(
        model, prompts, run_dir, redis_url,
        num_rollout=5, max_staleness=4, rollout_max_response_len=32, rollout_max_batch_size=4,
        rollout_temperature=1.0,
        # No dispatch before both servers attached: one alone can finish the run before the other
        # is up (both must be generating when the fault comes; test_chaos_leases.py does the same).
        rollout_attach_grace=scaled(60),
    )  # fmt: skip
    mesh = ChaosMesh(run_dir, values)
    try:
        reward = mesh.start_reward()
        coordinator = mesh.start_coordinator()
        port = coordinator.port
        for i in (0, 1):  # started together, so both are attached before the work runs out
            mesh.start_rollout(i, wait=False)

        def mid_generation():
            s = status(mesh)
            busy = (
                s
                and s.num_rollout_servers == 2
                and s.num_groups_completed >= 2
                and s.num_samples_in_flight > 0
            )
            return s if busy else None

        before = wait_for(mid_generation, 60, "both servers generating, some groups stored", interval=0.02)
        os.kill(coordinator.popen.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        coordinator.popen.wait(10)
        mesh.start("coordinator", "coordinator", "--reward-addr", reward.addr, "--port", str(port))
        serving_s = time.monotonic() - t_kill
        after = status(mesh)
        assert after.num_groups_completed >= before.num_groups_completed  # stored groups were kept
        assert after.num_groups_dispatched >= before.num_groups_dispatched - 2  # the journal lags little
        wait_for(lambda: (s := status(mesh)) and s.num_rollout_servers == 2, 30, "both servers re-attached")
        reattach_s = time.monotonic() - t_kill
        first = after.num_groups_completed
        wait_for(lambda: (s := status(mesh)) and s.num_groups_completed > first, 30, "a group stored")
        progress_s = time.monotonic() - t_kill
        wait_for(lambda: (s := status(mesh)) and s.num_groups_completed == GROUPS, 60, "every group stored")
        final = status(mesh)
        assert final.num_groups_dispatched == GROUPS and final.num_samples_in_flight == 0
        time.sleep(0.5)  # nothing more is admitted: the window is full
        assert status(mesh).num_groups_dispatched == GROUPS
        log = mesh.services["coordinator"].log()
    finally:
        mesh.stop()

    ids = buffer_group_ids(redis_url, values["run_id"])
    assert sorted(ids, key=lambda g: int(g[1:])) == [f"p{i}" for i in range(GROUPS)]  # each once, none lost
    assert "resumed (incarnation 1)" in log
    rows = ledger_rows(run_dir)
    dispatched = {r["uid"] for r in rows if r["event"] == "dispatched"}
    stored = [r["uid"] for r in rows if r["event"] == "stored"]
    assert len(stored) == len(set(stored)) == GROUPS * 4 and dispatched == set(stored)
    print(
        f"coordinator SIGKILLed with {before.num_groups_completed} groups stored, "
        f"{before.num_samples_in_flight} samples in flight: serving again after {serving_s:.2f}s, "
        f"both rollout servers re-attached after {reattach_s:.2f}s, next group stored after "
        f"{progress_s:.2f}s; {GROUPS}/{GROUPS} groups in the buffer, each once"
    )
