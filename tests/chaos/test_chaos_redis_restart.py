"""SIGKILL Redis mid-generation and start it again (same port, same data directory and AOF).

The mesh (reward, coordinator, 2 rollout servers, no trainer) runs on a Redis of its own. Redis
is killed while groups are being generated and stored, and restarted a second later. With
`appendfsync everysec` it comes back with a prefix of what it acknowledged: at most about the
last second of writes is gone, the buffer and the coordinator's journal alike (they are one
AOF). (A killed *process* loses nothing it acknowledged: Redis write()s the AOF to the kernel
before it replies, and the kernel keeps it; the fsync second is what a dying *machine* can
lose. The test measures which case it got.) The coordinator notices (a failed write, or a new `run_id`), waits for Redis, reloads its
journal and regenerates whatever the journal says is missing.

What must hold, and why it can be exact: a group's store is one MULTI/EXEC with the journal
write (buffer entry + out of assembly + counter + cursor), and AOF persists a transaction whole
or not at all. So a group either survived in the buffer and is not in assembly, or was lost
with its store and is in assembly again (or, lost with its admission, admitted again under the
same id): no group id can appear twice in the buffer. A duplicate would take a lost AOF
suffix that kept a later write but dropped an earlier one, which AOF does not do. So the test
asserts no duplicates at all, every group p0..p19 in the buffer at the end, and reports the
loss window: the groups stored before the kill that the restarted Redis no longer had, and how
far back the oldest of them was written.
"""

from __future__ import annotations

import os
import re
import signal
import time

import redis
from chaos_mesh import ChaosMesh, tiny_values, wait_for
from machine_speed import scaled
from test_chaos_coordinator import buffer_group_ids, ledger_rows, status

from slipstream.buffer.embedded import EmbeddedRedis

GROUPS = 20


def _entries(r: redis.Redis, stream: str) -> dict[str, float]:
    """Entry id -> the unix time it was written (the id's milliseconds)."""
    return {i.decode(): int(i.split(b"-")[0]) / 1000 for i, _ in r.xrange(stream)}


def test_redis_sigkilled_and_restarted_mid_generation(chaos_assets, tmp_path):
    model, prompts = chaos_assets
    run_dir = tmp_path / "run"
    server = EmbeddedRedis(tmp_path / "redis", start_timeout=scaled(20)).start()
    url, port = server.url, server.port
    values = tiny_values(
        model, prompts, run_dir, url,
        num_rollout=5, max_staleness=4, rollout_max_response_len=32, rollout_max_batch_size=4,
        rollout_temperature=1.0, reconnect_timeout=scaled(30),
        # No dispatch before both servers attached: one alone can finish the run before the other
        # is up (both must be generating when the fault comes; test_chaos_leases.py does the same).
        rollout_attach_grace=scaled(60),
    )  # fmt: skip
    stream = f"slipstream:{values['run_id']}:groups"
    mesh = ChaosMesh(run_dir, values)
    r = redis.Redis.from_url(url)
    try:
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert r.config_get("appendfsync")["appendfsync"] == "everysec"
        mesh.start_reward()
        mesh.start_coordinator()
        for i in (0, 1):
            mesh.start_rollout(i, wait=False)

        def busy():
            s = status(mesh)
            ok = (
                s
                and s.num_rollout_servers == 2
                and s.num_groups_completed >= 3
                and s.num_samples_in_flight > 0
            )
            return s if ok else None

        wait_for(busy, 60, "both servers generating, some groups stored", interval=0.02)
        before = _entries(r, stream)
        os.kill(server.pid, signal.SIGKILL)
        t_kill = time.time()
        server._proc.wait(scaled(10))
        server._proc = None
        time.sleep(1.0)  # down for a second: the coordinator's writes fail meanwhile
        server = EmbeddedRedis(tmp_path / "redis", port=port, start_timeout=scaled(20)).start()
        t_up = time.time()
        r = redis.Redis.from_url(url)
        survived = _entries(r, stream)
        lost = {i: t for i, t in before.items() if i not in survived}
        wait_for(lambda: (s := status(mesh)) and s.num_groups_completed == GROUPS, 60, "every group stored")
        log = mesh.services["coordinator"].log()
        reload_s = float(re.search(r"reloaded from the journal in ([0-9.]+)s", log).group(1))
        final = status(mesh)
        assert final.num_samples_in_flight == 0 and final.num_rollout_servers == 2
    finally:
        mesh.stop()
        r.close()
        server.stop()

    ids = buffer_group_ids_at(url, values["run_id"], tmp_path)
    assert len(ids) == len(set(ids)), f"a group stored twice: {ids}"
    assert sorted(ids, key=lambda g: int(g[1:])) == [f"p{i}" for i in range(GROUPS)]
    stored_rows = [row for row in ledger_rows(run_dir) if row["event"] == "stored"]
    window_s = max((t_kill - t for t in lost.values()), default=0.0)
    print(
        f"Redis SIGKILLed with {len(before)} groups in the buffer, restarted after {t_up - t_kill:.2f}s: "
        f"{len(lost)} lost with the AOF's last second (oldest written {window_s:.2f}s before the kill), "
        f"regenerated; {GROUPS}/{GROUPS} groups in the end, each once "
        f"({len(stored_rows) // 4 - GROUPS} stores redone per the dispatch ledger); the coordinator "
        f"noticed, waited and reloaded its journal in {reload_s:.2f}s"
    )


def buffer_group_ids_at(url: str, run_id: str, tmp_path) -> list[str]:
    """The buffer's group ids, read from the data directory with a fresh server (the mesh's is stopped)."""
    with EmbeddedRedis(tmp_path / "redis", start_timeout=scaled(20)) as again:
        return buffer_group_ids(again.url, run_id)
