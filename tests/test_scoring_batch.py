"""BatchedReward: the Score calls of one event-loop turn go as one call, each caller gets its own reply."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from slipstream.proto import reward_pb2, types_pb2
from slipstream.services.coordinator.scoring import BatchedReward, RewardUnavailable, score_once


class Stub:
    """The reward service's end: each sample's reward is its group index plus its index / 10."""

    def __init__(self, down: bool = False):
        self.requests: list[reward_pb2.ScoreRequest] = []
        self.down = down

    async def Score(self, request, timeout):  # noqa: N802 - the stub's name
        self.requests.append(request)
        await asyncio.sleep(0)
        if self.down:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "endpoint down"
            )
        return reward_pb2.ScoreReply(
            results=[reward_pb2.ScoreResult(reward=s.group_index + s.index / 10) for s in request.samples]
        )


def _group(index: int, n: int = 2) -> list[types_pb2.Sample]:
    return [types_pb2.Sample(uid=f"p{index}/{i}", group_index=index, index=i) for i in range(n)]


def _score_together(stub: Stub, groups: list[list[types_pb2.Sample]]) -> list:
    async def run():
        batched = BatchedReward(stub)
        return await asyncio.gather(
            *(score_once(batched, g, timeout=5) for g in groups), return_exceptions=True
        )

    return asyncio.run(run())


def test_calls_of_one_turn_go_as_one_and_each_gets_its_own_results():
    stub = Stub()
    replies = _score_together(stub, [_group(0), _group(1, n=3), _group(2)])
    assert len(stub.requests) == 1 and len(stub.requests[0].samples) == 7
    assert [[r.reward for r in reply] for reply in replies] == [
        pytest.approx([0.0, 0.1]),
        pytest.approx([1.0, 1.1, 1.2]),
        pytest.approx([2.0, 2.1]),
    ]


def test_groups_sharing_an_index_are_never_merged():
    # The service splits a request by group_index (one --group-rm call per group).
    stub = Stub()
    replies = _score_together(stub, [_group(5), _group(5), _group(6)])
    assert sorted(len(r.samples) for r in stub.requests) == [2, 4]
    assert all(len(reply) == 2 for reply in replies)


def test_an_unavailable_reward_fails_every_caller_of_the_call():
    replies = _score_together(Stub(down=True), [_group(0), _group(1)])
    assert all(isinstance(r, RewardUnavailable) for r in replies), replies
