"""Replay with reuse (`--max-reuse`) through a real Redis: fresh first, reuse fills, each training
counted once, nothing trained beyond K times or beyond the staleness bound."""

from __future__ import annotations

import threading

import pytest

from slipstream.algorithms.staleness import StalenessBound
from slipstream.buffer.replay import PAYLOAD, ReplayBuffer
from slipstream.config import config_from_values
from slipstream.proto import types_pb2
from slipstream.services.trainer.feed import Feed
from slipstream.services.trainer.ledger import Consumption
from slipstream.services.trainer.reconnect import Reconnect
from slipstream.services.trainer.state import TrainerState


def group(i: int, version: int = 0) -> types_pb2.Group:
    samples = [
        types_pb2.Sample(
            uid=f"p{i}/{j}", tokens=[1, 2, 3], response_length=1, reward=1.0, policy_versions=[version]
        )
        for j in range(2)
    ]
    return types_pb2.Group(group_id=f"g{i}", samples=samples)


@pytest.fixture
def buf(redis_url: str, run_id: str):
    with ReplayBuffer(redis_url, run_id) as b:
        yield b


def cfg(max_reuse: int = 2, max_staleness: int = 1):
    return config_from_values(
        dict(
            rollout_batch_size=2,
            n_samples_per_prompt=2,
            micro_batch_size=2,
            max_reuse=max_reuse,
            max_staleness=max_staleness,
        )
    )


def step(buf: ReplayBuffer, c, state: TrainerState, count: int = 2):
    """Collect, "train", commit with requeues, bump the version: what the loop does around training."""
    bound = StalenessBound.from_config(c)
    feed = Feed(
        buf, Consumption(max_reuse=c.train.max_reuse), Reconnect(c.infra.reconnect_timeout), bound, "t"
    )
    batch = feed.collect(count, state.policy_version, state.stop)
    requeue = feed.requeue(batch, state.policy_version + 1)
    buf.commit(
        [i for i, _ in batch.fresh],
        [r.entry_id for r in batch.reused] + batch.expired,
        requeue,
        reuse_maxlen=bound.reuse_capacity(),
    )
    state.policy_version += 1
    return batch, requeue


def test_each_group_trained_at_most_k_times(buf: ReplayBuffer):
    c, state = cfg(max_reuse=2, max_staleness=4), TrainerState()
    for i in range(2):
        buf.put_group(group(i))
    batch, requeue = step(buf, c, state)
    assert [g.group_id for _, g in batch.fresh] == ["g0", "g1"] and not batch.reused
    assert [(g.group_id, n) for g, n in requeue] == [("g0", 1), ("g1", 1)]
    assert buf.num_reuse() == 2 and buf.num_pending() == 0

    # no fresh groups: the step is filled from the reuse stream, oldest first
    batch, requeue = step(buf, c, state)
    assert not batch.fresh and [(r.group.group_id, r.times_trained) for r in batch.reused] == [
        ("g0", 1),
        ("g1", 1),
    ]
    assert requeue == []  # trained twice = K: never again
    assert buf.num_reuse() == 0  # committed reuse entries are deleted, not left behind

    # the next step waits for fresh data rather than training anything a third time
    buf.put_group(group(2))
    buf.put_group(group(3))
    batch, _ = step(buf, c, state)
    assert [g.group_id for _, g in batch.fresh] == ["g2", "g3"] and not batch.reused


def test_fresh_first_reuse_only_fills(buf: ReplayBuffer):
    c, state = cfg(max_reuse=3, max_staleness=4), TrainerState()
    for i in range(2):
        buf.put_group(group(i))
    step(buf, c, state)  # g0, g1 now wait for reuse
    buf.put_group(group(2))
    batch, requeue = step(buf, c, state)
    # one fresh group is there: it goes first; one reused group (the oldest) completes the batch
    assert [g.group_id for _, g in batch.fresh] == ["g2"]
    assert [r.group.group_id for r in batch.reused] == ["g0"]
    assert sorted((g.group_id, n) for g, n in requeue) == [("g0", 2), ("g2", 1)]
    assert buf.num_reuse() == 3  # g1 (still waiting), g0 again, g2


def test_stale_groups_are_not_reused(buf: ReplayBuffer):
    c, state = cfg(max_reuse=4, max_staleness=1), TrainerState(policy_version=1)
    buf.put_group(group(0, version=1))
    buf.put_group(group(1, version=0))  # trained at version 1: staleness 1, the bound
    batch, requeue = step(buf, c, state)
    # at the next version (2), g1 would be 2 versions old: not requeued; g0 (1 old) is
    assert [g.group_id for g, _ in requeue] == ["g0"]

    # g0 waits while training moves on: at version 5 it is 4 versions old, so when a step needs
    # it to fill up, it expires (deleted at commit, never trained) and fresh data is awaited
    state.policy_version = 5
    buf.put_group(group(9, version=5))
    late = threading.Timer(0.3, lambda: buf.put_group(group(10, version=5)))
    late.start()
    batch, _ = step(buf, c, state)
    late.join()
    assert [g.group_id for _, g in batch.fresh] == ["g9", "g10"] and not batch.reused
    assert len(batch.expired) == 1 and buf.num_reuse() == 2  # g9, g10 requeued; g0 gone


def test_reuse_stream_stays_bounded_when_fresh_data_keeps_up(buf: ReplayBuffer):
    c, state = cfg(max_reuse=3, max_staleness=1), TrainerState()
    for s in range(5):
        buf.put_group(group(2 * s, version=s))
        buf.put_group(group(2 * s + 1, version=s))
        batch, requeue = step(buf, c, state)
        assert not batch.reused and len(requeue) == 2  # fresh data always there: reuse never read
    # (max_staleness + 1) x rollout_batch_size entries at most, the newest ones
    assert buf.num_reuse() == StalenessBound.from_config(c).reuse_capacity() == 4
    assert [r.group.group_id for r in buf.read_reuse("t", 10)] == ["g6", "g7", "g8", "g9"]


def test_reuse_off_by_default(buf: ReplayBuffer):
    c, state = cfg(max_reuse=1), TrainerState()
    for i in range(2):
        buf.put_group(group(i))
    _, requeue = step(buf, c, state)
    assert requeue == [] and buf.num_reuse() == 0


def test_corrupt_reuse_entry_goes_to_dead_letters(buf: ReplayBuffer):
    buf.ensure_consumer_group()
    buf.redis.xadd(buf.keys.reuse, {PAYLOAD: b"\xff\xfe not a group", b"n": b"1"})
    buf.commit([], [], [(group(1), 1)])
    got = buf.read_reuse("t", 5)
    assert [r.group.group_id for r in got] == ["g1"] and got[0].times_trained == 1
    (dead,) = buf.dead_letters()
    assert dead[1]["source"] == buf.keys.reuse
    assert buf.num_reuse() == 1  # the corrupt entry is gone, g1 waits for its commit
