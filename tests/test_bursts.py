"""rpc/bursts.py: an outbox's queued runs of work items (or results) go as one batch message."""

from __future__ import annotations

import asyncio

from slipstream.proto import coordinator_pb2, types_pb2
from slipstream.rpc import bursts


def _work(work_id: str, tokens: int = 3) -> coordinator_pb2.RolloutCommand:
    item = coordinator_pb2.WorkItem(
        work_id=work_id, sample=types_pb2.Sample(uid=work_id, tokens=range(tokens))
    )
    return coordinator_pb2.RolloutCommand(work=item)


def _sent(queued: list) -> list[coordinator_pb2.RolloutCommand]:
    async def run():
        outbox: asyncio.Queue = asyncio.Queue()
        for msg in queued:
            outbox.put_nowait(msg)
        return [m async for m in bursts.coalesced(outbox, "work", "work_batch")]

    return asyncio.run(run())


def _ids(msg) -> list[str]:
    return [w.work_id for w in bursts.items(msg, "work", "work_batch")]


def test_a_queued_run_goes_as_one_batch_and_other_kinds_keep_their_place():
    weights = coordinator_pb2.RolloutCommand(new_weights=coordinator_pb2.NewWeights(version=2))
    abort = coordinator_pb2.RolloutCommand(abort=coordinator_pb2.AbortWork(work_ids=["a"]))
    sent = _sent(
        [_work("a"), _work("b"), _work("c"), weights, _work("d"), abort, _work("e"), _work("f"), None]
    )
    kinds = [m.WhichOneof("kind") for m in sent]
    assert kinds == ["work_batch", "new_weights", "work", "abort", "work_batch"]
    assert [_ids(m) for m in (sent[0], sent[2], sent[4])] == [["a", "b", "c"], ["d"], ["e", "f"]]
    assert sent[0].work_batch.items[1] == _work("b").work  # whole items, as sent


def test_the_stream_ends_at_none_even_right_after_a_run():
    assert [_ids(m) for m in _sent([_work("a"), _work("b"), None, _work("never")])] == [["a", "b"]]


def test_a_batch_stays_under_the_byte_limit(monkeypatch):
    one = _work("x", tokens=100).ByteSize()
    monkeypatch.setattr(bursts, "MAX_BATCH_BYTES", 2 * one + 1)
    sent = _sent([_work(f"{i}", tokens=100) for i in range(5)] + [None])
    assert [_ids(m) for m in sent] == [["0", "1"], ["2", "3"], ["4"]]


def test_results_batch_the_same_way():
    def result(work_id: str) -> coordinator_pb2.RolloutEvent:
        return coordinator_pb2.RolloutEvent(
            result=coordinator_pb2.SampleResult(work_id=work_id, lease_epoch=1)
        )

    async def run():
        outbox: asyncio.Queue = asyncio.Queue()
        for msg in [result("a"), result("b"), None]:
            outbox.put_nowait(msg)
        return [m async for m in bursts.coalesced(outbox, "result", "results")]

    (msg,) = asyncio.run(run())
    assert [r.work_id for r in bursts.items(msg, "result", "results")] == ["a", "b"]
