"""Redis at `maxmemory` with `noeviction` (how the launcher and docs run it): a full buffer is
backpressure with a clear error, never silent eviction; once trainers acknowledge and the stream
is trimmed, writes go through again and every group written is still there."""

from __future__ import annotations

import pytest

from slipstream.buffer.embedded import EmbeddedRedis
from slipstream.buffer.replay import BufferFull, ReplayBuffer
from slipstream.proto import types_pb2


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
