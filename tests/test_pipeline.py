"""The coordinator's `Pipeline` without gRPC, Redis or a reward service: a group's life by hand.

The pipeline is given small callables (`Ports`) and a journal; here they are `World` (attached
streams with a capacity, a policy version, a reward that pays the label, an in-memory partial
stream) and `Notebook` (what the journal was told, and the buffer the stores made). The tests
drive the events a servicer would forward (results, detaches, new versions) and read the stages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from slipstream.algorithms.staleness import StalenessBound
from slipstream.buffer.coordinator_store import CoordinatorCounters
from slipstream.buffer.replay import BufferFull
from slipstream.config import config_from_values
from slipstream.data import PromptRecord
from slipstream.proto import coordinator_pb2, types_pb2
from slipstream.services.coordinator import pipeline as pipeline_module
from slipstream.services.coordinator.dispatch_log import DispatchLog
from slipstream.services.coordinator.groups import Stage
from slipstream.services.coordinator.journal import StoreInDoubt
from slipstream.services.coordinator.pipeline import EPOCH_BITS, Pipeline, PipelineSettings, Ports
from slipstream.services.coordinator.prompts import Prompts
from slipstream.services.coordinator.scoring import Scored
from slipstream.services.coordinator.streams import Streams

pytestmark = pytest.mark.timeout(30)
RECORDS = [PromptRecord(prompt=f"q{i}", label=f"a{i}") for i in range(8)]


class World:
    """Everything outside the pipeline, as plain data."""

    def __init__(self, capacity: dict[str, int] | None = None):
        self.streams = dict(capacity or {"s#1": 8})
        self.sent: dict[str, list[coordinator_pb2.RolloutCommand]] = {}
        self.version = 0
        self.finished = False
        self.partial_stream: list[types_pb2.Sample] = []
        self.dead: list[tuple[str, str]] = []
        self.failing_rewards: set[str] = set()  # uids whose reward always fails
        self.num_resyncs = 0

    def ports(self) -> Ports:
        async def score(samples, failed):
            out = []
            for s in samples:
                if s.uid in self.failing_rewards:
                    failed(s, "boom")
                    out.append(Scored(error="boom", attempts=3))
                else:
                    out.append(Scored(reward=float(s.response == s.label), attempts=1))
            return out

        async def dead_letter(sample, reason):
            self.dead.append((sample.uid, reason))

        async def park(sample):
            self.partial_stream.append(sample)

        async def take(count):
            n = len(self.partial_stream) if count is None else count
            taken, self.partial_stream = self.partial_stream[:n], self.partial_stream[n:]
            return taken

        def resync():
            self.num_resyncs += 1

        return Ports(
            send=lambda cid, cmd: self.sent.setdefault(cid, []).append(cmd),
            capacity=lambda: dict(self.streams),
            version=lambda: self.version,
            finished=lambda: self.finished,
            score=score,
            dead_letter=dead_letter,
            park=park,
            take_partials=take,
            resync=resync,
        )

    def work(self, conn_id: str = "s#1") -> list[coordinator_pb2.WorkItem]:
        """The work items sent to a stream since the last call."""
        cmds, self.sent[conn_id] = self.sent.get(conn_id, []), []
        return [c.work for c in cmds if c.WhichOneof("kind") == "work"]

    def aborts(self, conn_id: str = "s#1") -> list[str]:
        return [
            w for c in self.sent.get(conn_id, []) if c.WhichOneof("kind") == "abort" for w in c.abort.work_ids
        ]


class Notebook:
    """The journal as the pipeline sees it: marks, drops, and the stores (the buffer, in order)."""

    def __init__(self):
        self.marked: set[str] = set()
        self.dropped: set[str] = set()
        self.buffer: list[types_pb2.Group] = []
        self.refusals: dict[str, list[Exception]] = {}  # group id -> raised by its next stores, one each
        self.batches: list[list[str]] = []  # the group ids of each store call

    def mark(self, group_id):
        self.marked.add(group_id)

    def drop(self, group_id):
        self.dropped.add(group_id)

    def touch(self):
        pass

    async def store_groups(self, groups, stored):
        self.batches.append([g.group_id for g in groups])
        for group in groups:
            if self.refusals.get(group.group_id):
                raise self.refusals[group.group_id].pop(0)
        self.buffer += groups
        stored()


def _pipeline(
    world: World, journal: Notebook, *, max_staleness=0, group_filter=None, counters=None, ports=None
) -> Pipeline:
    cfg = config_from_values(
        {
            "rollout_batch_size": 2,
            "n_samples_per_prompt": 2,
            "num_rollout": 4,
            "rollout_max_response_len": 8,
            "micro_batch_size": 1,
        }
    )
    bound = StalenessBound(max_staleness=max_staleness, groups_per_version=2, total_groups=8)
    settings = PipelineSettings(cfg.rollout, bound, seed=7, group_filter=group_filter)
    prompts = Prompts(RECORDS, [[1, 2, i] for i in range(len(RECORDS))], shuffle=False, seed=0)
    ports = ports or world.ports()
    return Pipeline(settings, prompts, ports, journal, DispatchLog(None), counters or CoordinatorCounters())


def _result(item: coordinator_pb2.WorkItem, text: str | None = None, aborted: bool = False, epoch=None):
    sample = types_pb2.Sample()
    sample.CopyFrom(item.sample)
    sample.tokens.extend([3, 4])
    sample.response_length += 2
    sample.response = sample.label if text is None else text
    sample.policy_versions.extend([item.min_policy_version] * 2)
    sample.status = types_pb2.SAMPLE_STATUS_ABORTED if aborted else types_pb2.SAMPLE_STATUS_COMPLETED
    return coordinator_pb2.SampleResult(
        work_id=item.work_id, lease_epoch=item.lease_epoch if epoch is None else epoch, sample=sample
    )


async def _settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


def _stages(p: Pipeline) -> dict[str, Stage]:
    return {gid: g.stage for gid, g in p.groups.items()}


def test_a_group_walks_its_stages_into_the_buffer():
    async def go():
        world, journal = World(), Notebook()
        p = _pipeline(world, journal)
        p.dispatch()
        items = world.work()
        # max_staleness 0, version 0: the window holds 2 groups, both admitted, all 4 samples out
        assert sorted(i.work_id for i in items) == ["p0/0", "p0/1", "p1/0", "p1/1"]
        assert _stages(p) == {"p0": Stage.GENERATING, "p1": Stage.GENERATING}
        assert (p.num_running, p.num_accepted, p.num_in_flight) == (2, 0, 4)
        assert journal.marked == {"p0", "p1"} and p.counters.cursor == 2
        by_id = {i.work_id: i for i in items}
        p.on_result("s#1", _result(by_id["p0/0"]))
        assert _stages(p)["p0"] is Stage.GENERATING  # one sample of two
        p.on_result("s#1", _result(by_id["p0/1"], text="wrong"))
        assert _stages(p)["p0"] is Stage.SCORING  # out of the ledger, at the reward service
        assert "p0" not in p.ledger.groups
        await _settle()
        assert [g.group_id for g in journal.buffer] == ["p0"] and "p0" not in p.groups
        assert [s.reward for s in journal.buffer[0].samples] == [1.0, 0.0]
        assert (p.counters.num_stored, p.num_accepted, p.num_running) == (1, 1, 1)
        assert world.work() == []  # the window is full: nothing new until the next version
        await p.close()

    asyncio.run(go())


def test_a_fast_later_group_waits_for_the_earlier_deadline():
    async def go():
        world, journal = World(), Notebook()
        p = _pipeline(world, journal)
        p.dispatch()
        first = {i.work_id: i for i in world.work()}  # p0, p1: deadline 2
        world.version = 1
        p.on_new_version()
        second = {i.work_id: i for i in world.work()}  # p2, p3: deadline 4
        assert sorted(second) == ["p2/0", "p2/1", "p3/0", "p3/1"]
        assert {g.deadline for g in p.groups.values()} == {2, 4}
        for item in second.values():
            p.on_result("s#1", _result(item))
        await _settle()
        # Done first, but positions 0 and 1 belong to p0 and p1 (deadline 2): p2 and p3 wait.
        assert _stages(p) == {
            "p0": Stage.GENERATING,
            "p1": Stage.GENERATING,
            "p2": Stage.READY,
            "p3": Stage.READY,
        }
        assert journal.buffer == []
        for wid in ("p1/0", "p1/1", "p0/0", "p0/1"):
            p.on_result("s#1", _result(first[wid]))
        await _settle()
        assert [g.group_id for g in journal.buffer] == ["p1", "p0", "p2", "p3"]
        assert p.groups == {} and p.counters.num_stored == 4
        await p.close()

    asyncio.run(go())


def test_the_filter_drops_a_group_and_another_prompt_takes_its_place():
    async def go():
        world, journal = World(), Notebook()
        p = _pipeline(world, journal, group_filter=lambda args, samples: samples[0].group_index != 0)
        p.dispatch()
        items = {i.work_id: i for i in world.work()}
        for wid in ("p0/0", "p0/1"):
            p.on_result("s#1", _result(items[wid]))
        await _settle()
        assert "p0" not in p.groups and journal.dropped == {"p0"} and p.counters.num_filtered == 1
        assert sorted(i.work_id for i in world.work()) == ["p2/0", "p2/1"]  # p0's place
        await p.close()

    asyncio.run(go())


def test_a_reward_that_keeps_failing_is_dead_lettered_and_the_group_still_stored():
    async def go():
        world, journal = World(), Notebook()
        world.failing_rewards = {"p0/1"}
        p = _pipeline(world, journal)
        p.dispatch()
        for item in world.work()[:2]:
            p.on_result("s#1", _result(item))
        await _settle()
        (group,) = journal.buffer
        assert [s.status for s in group.samples] == [
            types_pb2.SAMPLE_STATUS_COMPLETED,
            types_pb2.SAMPLE_STATUS_FAILED,
        ]
        assert world.dead == [("p0/1", "reward failed 3 times: boom")]
        assert (p.counters.num_reward_failures, p.counters.num_dead_lettered) == (1, 1)
        await p.close()

    asyncio.run(go())


def test_an_aborted_sample_is_parked_then_continued_before_any_new_prompt():
    async def go():
        world, journal = World({"s#1": 2}), Notebook()
        p = _pipeline(world, journal, max_staleness=1)
        p.dispatch()
        (a, b) = world.work()
        world.version = 1
        p.on_result("s#1", _result(a, aborted=True))
        assert p.ledger.parked == {a.work_id} and p.counters.num_partials_recycled == 1
        await _settle()
        # Written to the partial stream, taken back, and sent again ahead of any new prompt:
        (again,) = world.work()
        assert again.work_id == a.work_id and again.lease_epoch == a.lease_epoch + 1
        assert again.sample.response_length == 2 and again.min_policy_version == 1  # the newest
        assert again.sampling.max_new_tokens == 8 - 2  # what is left of the response budget
        assert not world.partial_stream and not p.ledger.parked
        await p.close()

    asyncio.run(go())


def test_a_detached_stream_gives_its_samples_to_another_under_new_epochs():
    async def go():
        world, journal = World({"a#1": 2, "b#2": 0}), Notebook()
        p = _pipeline(world, journal)
        p.dispatch()
        on_a = world.work("a#1")
        assert len(on_a) == 2 and world.work("b#2") == []
        world.streams = {"b#2": 4}
        assert p.on_detach("a#1") == 2
        on_b = world.work("b#2")  # a's samples first (recovered work), then the next group
        assert [i.work_id for i in on_b] == [i.work_id for i in on_a] + ["p1/0", "p1/1"]
        assert [i.lease_epoch for i in on_b] == [2, 2, 1, 1]
        p.on_result("a#1", _result(on_a[0]))  # the old lease: ignored
        assert p.groups["p0"].results == {}
        await p.close()

    asyncio.run(go())


def test_a_full_buffer_waits_a_store_in_doubt_resyncs_a_lost_store_is_replaced(monkeypatch):
    monkeypatch.setattr(pipeline_module, "BUFFER_FULL_RETRY_S", 0.01)

    async def go():
        world, journal = World(), Notebook()
        journal.refusals = {
            "p0": [BufferFull("full")],
            "p1": [StoreInDoubt("reset")],
            "p2": [ValueError("bad")],
        }
        p = _pipeline(world, journal, max_staleness=3)  # room for all 8 groups
        p.dispatch()
        items = {i.work_id: i for i in world.work()}
        for gid in ("p0", "p1", "p2"):
            for k in (0, 1):
                p.on_result("s#1", _result(items[f"{gid}/{k}"]))
            await asyncio.sleep(0.05)
        # p0: full once, then stored; p1: in doubt (only a reload can tell); p2: lost, replaced
        assert [g.group_id for g in journal.buffer] == ["p0"]
        assert _stages(p)["p1"] is Stage.IN_DOUBT and world.num_resyncs == 1
        assert "p2" not in p.groups and p.num_accepted == 2  # stored p0 + p1 in doubt
        assert "p4" in p.groups  # another prompt took p2's place
        await p.close()

    asyncio.run(go())


def test_a_closed_pipeline_lands_nothing():
    async def go():
        world, journal = World(), Notebook()
        release = asyncio.Event()

        async def slow_score(samples, failed):
            await release.wait()
            return [Scored(reward=1.0, attempts=1) for _ in samples]

        p = _pipeline(world, journal, ports=dataclasses.replace(world.ports(), score=slow_score))
        p.dispatch()
        for item in world.work()[:2]:
            p.on_result("s#1", _result(item))
        assert _stages(p)["p0"] is Stage.SCORING
        p.abort_all()
        assert sorted(world.aborts()) == ["p1/0", "p1/1"]
        await p.close()  # a reload replaced it
        release.set()
        await _settle()
        assert journal.buffer == [] and _stages(p)["p0"] is Stage.SCORING

    asyncio.run(go())


def test_a_restored_pipeline_rescores_finished_groups_and_issues_epochs_above_its_incarnation():
    from slipstream.services.coordinator.journal import from_record, to_record

    async def go():
        world, journal = World(), Notebook()
        first = _pipeline(world, journal)
        first.dispatch()
        items = {i.work_id: i for i in world.work()}
        for wid in ("p0/0", "p0/1", "p1/0"):
            first.on_result("s#1", _result(items[wid]))
        # the journal's records, taken while p0 is still scoring
        counters, records = first.snapshot({"p0", "p1"})
        await first.close()
        assert counters.cursor == 2
        journal = Notebook()
        second = _pipeline(world, journal, counters=CoordinatorCounters(cursor=2, incarnation=1))
        for gid in ("p0", "p1"):
            record = coordinator_pb2.JournalGroup.FromString(records[gid])
            second.restore(from_record(record), set(record.parked))
        second.start()
        await _settle()
        assert [g.group_id for g in journal.buffer] == ["p0"]  # scored again and stored
        second.dispatch()
        (again,) = world.work()
        assert again.work_id == "p1/1" and again.lease_epoch == (1 << EPOCH_BITS) + 1
        assert to_record(second.groups["p1"], set()).results[0].response == "a1"
        await second.close()

    asyncio.run(go())


def test_a_stage_only_moves_along_its_arrows():
    async def go():
        world, journal = World(), Notebook()
        p = _pipeline(world, journal)
        p.dispatch()
        with pytest.raises(RuntimeError, match="GENERATING to STORING"):
            p._move(p.groups["p0"], Stage.STORING)
        await p.close()

    asyncio.run(go())


def test_a_fresh_run_waits_for_its_fleet_then_the_grace_opens_the_gate():
    """Every service starts at once: the first dispatch waits for --rollout-num-servers streams,
    at most the grace after the first attached (a server that never comes holds nothing up)."""
    streams = Streams(lease_timeout=30.0, expected_servers=2, grace_s=0.2)
    assert streams.capacity() == {}  # nobody attached yet
    first = streams.attach("rollout-0", 4, 0)
    assert streams.capacity() == {} and not streams.fleet_ready()
    streams.attach("rollout-1", 4, 0)
    assert streams.capacity() == {first.conn_id: 4, "rollout-1#2": 4}

    alone = Streams(lease_timeout=30.0, expected_servers=2, grace_s=0.2)
    conn = alone.attach("rollout-0", 4, 0)
    assert not alone.fleet_opened_now()
    time.sleep(0.25)
    assert alone.fleet_opened_now()  # the grace ran out: the heartbeat that sees it dispatches
    assert not alone.fleet_opened_now()  # once
    assert alone.capacity() == {conn.conn_id: 4}
    alone.detach(conn)
    assert alone.fleet_ready()  # open for good: servers come and go


def test_a_resumed_run_takes_whoever_comes_back():
    streams = Streams(lease_timeout=30.0)  # expected_servers 0: a journal was found
    conn = streams.attach("rollout-1", 2, 3)
    assert streams.capacity() == {conn.conn_id: 2}


def test_groups_waiting_together_go_in_one_store_and_a_bad_one_alone_is_lost():
    """Groups that finish while a store runs wait and go together, in position order; a batch
    that fails with an error that wrote nothing is tried again one group at a time, so only the
    group that fails alone is lost (and replaced)."""

    async def go():
        world, journal = World(), Notebook()
        journal.refusals = {"p3": [ValueError("bad"), ValueError("bad")]}
        p = _pipeline(world, journal, max_staleness=3)  # room for all 8 groups
        p.dispatch()
        items = {i.work_id: i for i in world.work()}
        for gid in ("p0", "p1", "p2", "p3"):  # all in one event-loop turn
            for k in (0, 1):
                p.on_result("s#1", _result(items[f"{gid}/{k}"]))
        await asyncio.sleep(0.05)
        assert journal.batches[0] == ["p0", "p1", "p2", "p3"]  # scored together, stored together
        assert journal.batches[1:] == [["p0"], ["p1"], ["p2"], ["p3"]]  # that failed: one at a time
        assert [g.group_id for g in journal.buffer] == ["p0", "p1", "p2"]
        assert "p3" not in p.groups and p.num_accepted == 3
        await p.close()

    asyncio.run(go())
