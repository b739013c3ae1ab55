"""Scoring a finished group, with retries: a sample whose reward keeps failing becomes a dead letter.

A group's samples go to the reward service in one `Score` call. A sample whose scoring fails
(the call failed, or the service marked that sample failed: a remote endpoint down, a custom
reward function that raised) is scored again, alone with the others that failed, after a
backoff, up to `--reward-max-failures` attempts in total. A sample that fails them all is
*dead-lettered* by the caller: copied to the dead-letter stream with the last error, FAILED in
its group (the trainer never trains on it) and counted; the group is still stored, so one bad
sample never stalls a run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from slipstream.proto import reward_pb2, reward_pb2_grpc, types_pb2

BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.2, 2.0


@dataclass
class Scored:
    reward: float = 0.0
    error: str = ""  # the last error; set only when every attempt failed
    attempts: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.error)


async def score_once(
    reward: reward_pb2_grpc.RewardStub, samples: list[types_pb2.Sample], timeout: float
) -> list[reward_pb2.ScoreResult]:
    """One `Score` call; a failed call or a malformed reply fails every sample of it."""
    try:
        reply = await reward.Score(reward_pb2.ScoreRequest(samples=samples), timeout=timeout)
    except grpc.aio.AioRpcError as e:
        error = f"reward service: {e.code().name}: {e.details()}"
        return [reward_pb2.ScoreResult(failed=True, error=error) for _ in samples]
    if len(reply.results) != len(samples):
        error = f"reward service returned {len(reply.results)} results for {len(samples)} samples"
        return [reward_pb2.ScoreResult(failed=True, error=error) for _ in samples]
    return list(reply.results)


async def score_with_retries(
    reward: reward_pb2_grpc.RewardStub,
    samples: list[types_pb2.Sample],
    timeout: float,
    max_failures: int,
    on_failure: Callable[[types_pb2.Sample, str], None] = lambda sample, error: None,
) -> list[Scored]:
    """Every sample's reward, or its last error after `max_failures` failed attempts."""
    out = [Scored() for _ in samples]
    pending = list(range(len(samples)))
    backoff = BACKOFF_FIRST_S
    while pending:
        results = await score_once(reward, [samples[i] for i in pending], timeout)
        still = []
        for i, result in zip(pending, results, strict=True):
            out[i].attempts += 1
            if not result.failed:
                out[i].reward = result.reward
                continue
            on_failure(samples[i], result.error)
            if out[i].attempts >= max_failures:
                out[i].error = result.error or "reward failed"
            else:
                still.append(i)
        pending = still
        if pending:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
    return out
