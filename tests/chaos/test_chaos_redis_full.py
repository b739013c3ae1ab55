"""Redis at `maxmemory` with `noeviction` (how the launcher and docs run it): a full buffer is
backpressure with a clear error, never silent eviction; once trainers acknowledge and the stream
is trimmed, writes go through again and every group written is still there."""

from __future__ import annotations

import re
import time

import pytest
import redis
from chaos_mesh import ChaosMesh, tiny_values, wait_for

from slipstream.buffer.embedded import EmbeddedRedis
from slipstream.buffer.replay import BufferFull, ReplayBuffer
from slipstream.proto import types_pb2

# a refused store names its groups, the first (lowest position) first
NOT_STORED = r"groups? (p\d+)(?:, p\d+)* not stored"


def _group(i: int) -> types_pb2.Group:
    sample = types_pb2.Sample(uid=f"p{i}/0", tokens=list(range(200)), response_length=100)
    sample.rollout_log_probs.extend([-0.5] * 100)
    return types_pb2.Group(group_id=f"p{i}", samples=[sample] * 4)


def test_a_full_redis_is_backpressure_and_loses_nothing(tmp_path):
    with EmbeddedRedis(tmp_path / "redis") as server:
        buffer = ReplayBuffer(server.url, "full")
        buffer.ensure_consumer_group()
        used = int(buffer.redis.info("memory")["used_memory"])
        buffer.redis.config_set("maxmemory", used + 2 * 1024 * 1024)
        assert buffer.redis.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"

        stored: list[str] = []
        with pytest.raises(BufferFull, match="maxmemory") as full:
            for i in range(100_000):
                buffer.put_group(_group(i))
                stored.append(f"p{i}")
        assert "\n" not in str(full.value)
        assert len(stored) > 10
        # Nothing was evicted: every group that was accepted is in the stream, in order.
        assert buffer.num_groups() == len(stored)
        # Trainers consume and acknowledge; trimming frees memory; writes resume.
        read = []
        while batch := buffer.read_groups("trainer-0", count=500, block_ms=0):
            read += [g.group_id for _, g in batch]
            buffer.ack([entry_id for entry_id, _ in batch])
        assert read == stored
        assert buffer.trim_acknowledged() == len(stored)
        buffer.put_group(_group(len(stored)))
        assert [g.group_id for _, g in buffer.read_groups("trainer-0", count=5, block_ms=0)] == [
            f"p{len(stored)}"
        ]
        buffer.close()


def test_the_coordinator_holds_groups_while_redis_is_full(chaos_assets, tmp_path):
    """The coordinator's store loop under a full Redis (real coordinator, reward, rollout server;
    no trainer, so nothing ever frees space by itself).

    Once 3 groups are stored, Redis's `maxmemory` is set to what it uses: the coordinator's next
    write tips it over and its store transaction (the group's XADD with the journal's pending
    writes, one MULTI/EXEC) is refused with OOM. (Filling a margin with this run's small groups
    is not repeatable: one-time allocations -- a new client connection's buffers, the stream's
    next node -- move the point where a margin runs out by tens of KiB from run to run; a 12 KiB
    margin ran out after 1 group, a 32 KiB one not within 19.) That must be backpressure: the
    coordinator logs it, keeps the group and retries every second; nothing is dropped, nothing
    evicted, and Redis refusing a write is not mistaken for a Redis restart (no reload from the
    journal). Once `maxmemory` is raised, every held group is stored, each once, in the order
    its buffer position was given (the entries' `created_unix_ms`, stamped when the position is
    given, never decrease along the stream).
    """
    model, prompts = chaos_assets
    groups = 20  # the whole run: 5 rollouts of 4 prompts, all admissible without a trainer
    with EmbeddedRedis(tmp_path / "redis") as server:
        r = redis.Redis.from_url(server.url)
        run = tmp_path / "run"
        values = tiny_values(
            model, prompts, run, server.url,
            num_rollout=groups // 4, max_staleness=groups // 4, rollout_max_response_len=16,
            rollout_max_batch_size=4,  # one group generating at a time: the buffer fills group by group
        )  # fmt: skip
        mesh = ChaosMesh(run, values)
        stream = f"slipstream:{values['run_id']}:groups"
        try:
            mesh.start_reward()
            coordinator = mesh.start_coordinator()
            mesh.start_rollout(0)
            wait_for(lambda: r.xlen(stream) >= 3, 60, "3 groups stored", interval=0.02)
            r.config_set("maxmemory", int(r.info("memory")["used_memory"]))  # full from here on

            def refused() -> list[str]:
                return re.findall(NOT_STORED, coordinator.log())

            wait_for(refused, 60, "the coordinator's store refused (Redis full)", interval=0.02)
            full_at = time.monotonic()
            stored_before = r.xlen(stream)
            time.sleep(2.5)  # it holds the group and retries: the stream does not move
            assert r.xlen(stream) == stored_before
            held_refusals = len(refused())
            r.config_set("maxmemory", 0)  # space is freed
            freed_at = time.monotonic()
            wait_for(lambda: r.xlen(stream) > stored_before, 10, "the held group stored")
            first_stored_s = time.monotonic() - freed_at
            wait_for(lambda: r.xlen(stream) == groups, 60, f"all {groups} groups stored")
            all_stored_s = time.monotonic() - freed_at
            evicted = int(r.info("stats")["evicted_keys"])
            entries = r.xrange(stream)
        finally:
            mesh.stop()
        r.close()

    log = coordinator.log()
    ids, stamps = [], []
    for _, fields in entries:
        group = types_pb2.Group()
        group.ParseFromString(fields[b"p"])
        ids.append(group.group_id)
        stamps.append(group.created_unix_ms)
    assert sorted(ids, key=lambda g: int(g[1:])) == [f"p{i}" for i in range(groups)]  # each once, none lost
    assert stamps == sorted(stamps)  # in position order
    first_refused = re.search(NOT_STORED, log).group(1)
    assert ids[stored_before] == first_refused  # the held group went in first, where it was refused
    assert "Redis is full (maxmemory, noeviction)" in log and "retrying in 1s" in log
    assert held_refusals >= 3  # retried about every second while full
    assert evicted == 0
    assert "reloading" not in log and "reloaded from the journal" not in log, log[-3000:]
    print(
        f"Redis full after {stored_before} groups stored; the coordinator held group {first_refused} "
        f"for {freed_at - full_at:.1f}s ({held_refusals} refused attempts), stored it "
        f"{first_stored_s:.2f}s after maxmemory was raised; all {groups} ({groups - stored_before} after the refusal) stored "
        f"once, in order, "
        f"{all_stored_s:.2f}s after; evicted = 0"
    )
