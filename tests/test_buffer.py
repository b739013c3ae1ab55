"""The replay buffer against a real embedded Valkey (the `redis_url` fixture)."""

from __future__ import annotations

import time

import pytest
import redis

from slipstream.buffer.embedded import EmbeddedRedis, RedisServerError, server_command, wait_for_redis
from slipstream.buffer.keys import Keys
from slipstream.buffer.replay import ReplayBuffer
from slipstream.proto import types_pb2


def make_group(i: int, n: int = 2) -> types_pb2.Group:
    samples = [
        types_pb2.Sample(
            uid=f"p{i}/{j}", group_index=i, index=j, tokens=[1, 2, 3], response_length=1, reward=0.5
        )
        for j in range(n)
    ]
    return types_pb2.Group(group_id=f"g{i}", samples=samples, created_unix_ms=1000 + i)


@pytest.fixture
def buf(redis_url: str, run_id: str):
    with ReplayBuffer(redis_url, run_id) as b:
        yield b


def ids_of(entries: list[tuple[str, types_pb2.Group]]) -> list[str]:
    return [g.group_id for _, g in entries]


def test_put_read_ack_roundtrip(buf: ReplayBuffer):
    sent = [make_group(i) for i in range(3)]
    entry_ids = [buf.put_group(g) for g in sent]
    assert buf.num_groups() == 3

    got = buf.read_groups("t0", count=10, block_ms=0)
    assert [e for e, _ in got] == entry_ids
    assert [g for _, g in got] == sent  # protobuf equality: every field survived
    assert buf.num_pending() == 3
    assert buf.read_groups("t0", count=10, block_ms=0) == []  # '>' never redelivers

    assert buf.ack(entry_ids[:2]) == 2
    assert buf.num_pending() == 1
    assert buf.ack(entry_ids[:2]) == 0  # acking twice is harmless and says so
    assert buf.ack([]) == 0


def test_read_blocks_until_timeout_when_empty(buf: ReplayBuffer):
    start = time.monotonic()
    assert buf.read_groups("t0", count=1, block_ms=200) == []
    assert time.monotonic() - start >= 0.15


def test_put_refuses_empty_group(buf: ReplayBuffer):
    with pytest.raises(ValueError, match="no samples"):
        buf.put_group(types_pb2.Group(group_id="empty"))


def test_two_consumers_share_work_without_duplicates(redis_url: str, run_id: str):
    with ReplayBuffer(redis_url, run_id) as a, ReplayBuffer(redis_url, run_id) as b:
        for i in range(10):
            a.put_group(make_group(i))
        got_a = a.read_groups("trainer-a", count=4, block_ms=0)
        got_b = b.read_groups("trainer-b", count=4, block_ms=0)
        got_a += a.read_groups("trainer-a", count=4, block_ms=0)
        got_b += b.read_groups("trainer-b", count=4, block_ms=0)
        seen = ids_of(got_a) + ids_of(got_b)
        assert sorted(seen) == sorted(f"g{i}" for i in range(10))
        assert len(set(seen)) == 10
        assert (len(got_a), len(got_b)) == (6, 4)  # 4, 4, then the last 2, then none


def test_claim_stale_reclaims_unacked_entries(buf: ReplayBuffer):
    for i in range(4):
        buf.put_group(make_group(i))
    dead = buf.read_groups("dead-trainer", count=3, block_ms=0)
    buf.ack([dead[0][0]])

    assert buf.claim_stale("live", min_idle_ms=60_000) == []  # not idle long enough yet
    time.sleep(0.1)
    claimed = buf.claim_stale("live", min_idle_ms=50)
    assert ids_of(claimed) == ["g1", "g2"]  # the unacked ones, not the acked one
    assert buf.num_pending() == 2
    # Claimed entries now belong to "live": acking them empties the pending list.
    assert buf.ack([e for e, _ in claimed]) == 2
    assert buf.num_pending() == 0
    # The never-delivered one is still there for a normal read.
    assert ids_of(buf.read_groups("live", count=10, block_ms=0)) == ["g3"]


def test_claim_stale_respects_count(buf: ReplayBuffer):
    for i in range(5):
        buf.put_group(make_group(i))
    buf.read_groups("dead", count=5, block_ms=0)
    time.sleep(0.05)
    assert ids_of(buf.claim_stale("live", min_idle_ms=10, count=2)) == ["g0", "g1"]
    assert ids_of(buf.claim_stale("live2", min_idle_ms=10_000)) == []  # just claimed: idle reset


def test_trim_only_behind_acknowledged(buf: ReplayBuffer):
    ids = [buf.put_group(make_group(i)) for i in range(6)]
    assert buf.trim_acknowledged() == 0  # nothing delivered yet

    buf.read_groups("t", count=4, block_ms=0)  # g0..g3 pending, g4, g5 undelivered
    buf.ack([ids[0], ids[2]])  # g1 still pending: trim must stop before it
    assert buf.trim_acknowledged() == 1
    assert buf.num_groups() == 5

    buf.ack([ids[1], ids[3]])  # all delivered ones acked; g4, g5 never delivered stay
    assert buf.trim_acknowledged() == 3
    assert buf.num_groups() == 2
    assert ids_of(buf.read_groups("t", count=10, block_ms=0)) == ["g4", "g5"]
    assert buf.trim_acknowledged() == 0  # both pending now


def test_corrupt_payload_goes_to_dead_letter(buf: ReplayBuffer):
    buf.put_group(make_group(0))
    bad_id = buf.redis.xadd(buf.keys.groups, {b"p": b"\xff\xfe not protobuf"}).decode()
    buf.redis.xadd(buf.keys.groups, {b"wrong": b"field"})
    buf.put_group(make_group(3))

    got = buf.read_groups("t", count=10, block_ms=0)
    assert ids_of(got) == ["g0", "g3"]  # skipped, not crashed
    assert buf.num_pending() == 2  # the corrupt ones were acknowledged

    letters = buf.dead_letters()
    assert len(letters) == 2
    _, first = letters[0]
    assert first["payload"] == b"\xff\xfe not protobuf"
    assert first["entry_id"] == bad_id
    assert first["source"] == buf.keys.groups
    assert "not a Group" in first["reason"]
    assert "no 'p' field" in letters[1][1]["reason"]


def test_dead_letter_direct(buf: ReplayBuffer):
    entry = buf.dead_letter(b"abc", "reward service said no")
    ((got_id, row),) = buf.dead_letters()
    assert got_id == entry and row["payload"] == b"abc" and row["reason"] == "reward service said no"


def test_partials_are_taken_once_in_order(redis_url: str, run_id: str):
    with ReplayBuffer(redis_url, run_id) as a, ReplayBuffer(redis_url, run_id) as b:
        for i in range(5):
            a.partials.put(types_pb2.Sample(uid=f"p{i}/0", tokens=[1, 2, i], response_length=1))
        a.redis.xadd(a.keys.partials, {b"p": b"\xff\xff"})
        first = a.partials.take(3)
        rest = b.partials.take(10)
        assert [s.uid for s in first] == ["p0/0", "p1/0", "p2/0"]
        assert [s.uid for s in rest] == ["p3/0", "p4/0"]  # the corrupt one went to dead letters
        assert first[2].tokens == [1, 2, 2]
        assert a.partials.count() == 0 and a.partials.take(5) == []
        assert len(a.dead_letters()) == 1


def test_consumer_group_survives_stream_deletion(buf: ReplayBuffer):
    buf.put_group(make_group(0))
    assert ids_of(buf.read_groups("t", count=1, block_ms=0)) == ["g0"]
    buf.redis.delete(buf.keys.groups)  # a reset run: stream and group gone
    buf.put_group(make_group(1))
    assert ids_of(buf.read_groups("t", count=1, block_ms=0)) == ["g1"]


def test_keys_share_one_prefix_per_run():
    k = Keys("run7")
    names = [
        k.groups,
        k.partials,
        k.dead_letter,
        k.coordinator_state,
        k.assembly,
        k.last_stored,
        k.leases,
        k.trainer_state,
        k.heartbeat("r0"),
    ]
    assert all(n.startswith("slipstream:run7:") for n in names)
    assert len(set(names)) == len(names)
    with pytest.raises(ValueError):
        Keys("has space")


def test_embedded_server_runs_with_aof_and_noeviction(redis_url: str):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("bind")["bind"].split() == ["127.0.0.1"]
    finally:
        client.close()


def test_server_command_flags(tmp_path):
    cmd = server_command(tmp_path, 6399, password="s3cret", binary="/bin/valkey-server")
    assert cmd[0] == "/bin/valkey-server"
    pairs = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert pairs["--port"] == "6399" and pairs["--dir"] == str(tmp_path.resolve())
    assert pairs["--appendonly"] == "yes" and pairs["--save"] == "" and pairs["--requirepass"] == "s3cret"


def test_embedded_restart_keeps_data_and_password(tmp_path):
    with EmbeddedRedis(tmp_path, password="pw") as server:
        pid = server.pid
        with ReplayBuffer(server.url, "persist") as b:
            b.put_group(make_group(0))
        port = server.port
    assert pid is not None and server.pid is None
    with pytest.raises(RedisServerError, match="not answering"):
        wait_for_redis(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    # Same directory, new process: the AOF (written on the SIGTERM shutdown) brings the group back.
    with EmbeddedRedis(tmp_path, password="pw") as server, ReplayBuffer(server.url, "persist") as b:
        assert ids_of(b.read_groups("t", count=5, block_ms=0)) == ["g0"]
        with pytest.raises(RedisServerError, match=r"redis://:\*\*\*@127\.0\.0\.1"):
            wait_for_redis(server.url.replace(":pw@", ":wrong@"), timeout=1.0)


def test_clear_run_deletes_this_run_only(redis_url: str, run_id: str):
    with ReplayBuffer(redis_url, run_id) as mine, ReplayBuffer(redis_url, run_id + "-other") as other:
        mine.put_group(make_group(0))
        mine.partials.put(make_group(1).samples[0])
        mine.redis.hset(mine.keys.coordinator_state, "cursor", 3)
        other.put_group(make_group(2))

        assert mine.clear_run() == 3
        assert mine.num_groups() == 0 and mine.partials.count() == 0
        assert not mine.redis.exists(mine.keys.coordinator_state)
        assert other.num_groups() == 1  # another run's keys are untouched
        assert mine.clear_run() == 0
