"""Scoring a finished group, with retries: a sample whose reward keeps failing becomes a dead letter.

A group's samples go to the reward service in one `Score` call (the calls of one event-loop turn
travel as one, `BatchedReward`). A sample whose scoring fails
(the call failed, or the service marked that sample failed: a remote endpoint down, a custom
reward function that raised) is scored again, alone with the others that failed, after a
backoff, up to `--reward-max-failures` attempts in total. A sample that fails them all is
*dead-lettered* by the caller: copied to the dead-letter stream with the last error, FAILED in
its group (the trainer never trains on it) and counted; the group is still stored, so one bad
sample never stalls a run.

An *unavailable* reward is another matter: the reward service unreachable, or its remote
endpoint's circuit breaker open (the service answers UNAVAILABLE, naming the endpoint and the
error). No sample is at fault, so no attempt is counted and nothing is dead-lettered: the
`RewardGate` goes down (the console says so, and the pipeline admits no new prompt while it is
down), the call is tried again with backoff, and the first answer puts the gate up again. Down
for `--reward-outage-timeout` seconds, the gate calls `on_fatal` and the coordinator stops with
one line. The breaker itself lives in the reward service, which alone sees the endpoint and can
tell "down" from "this sample cannot be scored"; admission, and the run, are the coordinator's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from slipstream.console import console_log
from slipstream.proto import reward_pb2, reward_pb2_grpc, types_pb2

log = logging.getLogger(__name__)
console = console_log()

BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.2, 2.0
UNAVAILABLE_FIRST_S, UNAVAILABLE_MAX_S = 0.5, 5.0  # tries of a Score while the reward is down


class RewardUnavailable(Exception):
    """The reward service, or its endpoint, is down: no sample's fault."""


class RewardOutage(TimeoutError):
    """The reward stayed unavailable past --reward-outage-timeout: the coordinator stops with this line."""


class RewardGate:
    """Whether the reward path is up; while it is down, admission pauses (`Ports.reward_up`)."""

    def __init__(self, outage_timeout: float, on_fatal: Callable[[], None] = lambda: None):
        self.outage_timeout = outage_timeout
        self.on_fatal = on_fatal
        self.down_since: float | None = None
        self.last_error = ""
        self.fatal = ""  # set once the outage outlasted the timeout
        self.waiters = 0  # scoring calls waiting to try the reward again
        self._timer: asyncio.Task | None = None

    @property
    def is_up(self) -> bool:
        return self.down_since is None

    def down(self, error: str) -> None:
        self.last_error = error
        if self.down_since is not None:
            return
        self.down_since = time.monotonic()
        console.warning(
            "reward unavailable (%s): admission paused; the run stops if this lasts "
            "--reward-outage-timeout %gs",
            error,
            self.outage_timeout,
        )
        self._timer = asyncio.get_running_loop().create_task(self._expire(self.down_since))

    def up(self) -> None:
        if self.down_since is None:
            return
        console.info(
            "reward available again after %.1fs; admission resumed", time.monotonic() - self.down_since
        )
        self.down_since = None
        if self._timer is not None:
            self._timer.cancel()

    def forget(self) -> None:
        """Nobody waits on the reward any more (their pipeline was replaced): the next call tells."""
        if self.down_since is not None:
            log.info("no scoring call waits on the reward any more; admission resumes until one fails")
            self.down_since = None
            if self._timer is not None:
                self._timer.cancel()

    async def _expire(self, since: float) -> None:
        await asyncio.sleep(self.outage_timeout)
        if self.down_since == since and not self.fatal:
            self.fatal = f"reward unavailable for {self.outage_timeout:g}s (--reward-outage-timeout): {self.last_error}"
            console.error("%s; stopping", self.fatal)
            self.on_fatal()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class BatchedReward:
    """The reward stub, with the `Score` calls of one event-loop turn sent as one call.

    Groups finish in bursts (a burst of results completes several at once), and each `Score`
    call costs both processes a fixed price that, at 64 groups a step on a 2-core box, was most
    of the reward service's CPU (issue 14). Callers still make one call per group and get their
    own reply; the service splits a request by `group_index` anyway (one group per `--group-rm`
    call), so calls whose groups share an index are never merged. A failed call fails every
    caller in it the same way, which is why only built-in rules are batched (server.py): a remote
    endpoint that is down fails a whole call UNAVAILABLE, and one group's call must not hold
    another's failures back.
    """

    def __init__(self, stub: reward_pb2_grpc.RewardStub):
        self.stub = stub
        self._queued: list[tuple[reward_pb2.ScoreRequest, float, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()

    async def Score(self, request: reward_pb2.ScoreRequest, timeout: float) -> reward_pb2.ScoreReply:  # noqa: N802 - the stub's name
        fut = asyncio.get_running_loop().create_future()
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append((request, timeout, fut))
        return await fut

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        batches: list[list] = []
        indices: list[set[int]] = []
        for call in queued:
            mine = {s.group_index for s in call[0].samples}
            for batch, taken in zip(batches, indices, strict=True):
                if not mine & taken:
                    batch.append(call)
                    taken |= mine
                    break
            else:
                batches.append([call])
                indices.append(mine)
        for batch in batches:
            task = asyncio.get_running_loop().create_task(self._call(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[tuple[reward_pb2.ScoreRequest, float, asyncio.Future]]) -> None:
        if len(batch) == 1:
            request, timeout, fut = batch[0]
        else:
            request = reward_pb2.ScoreRequest(samples=[s for r, _, _ in batch for s in r.samples])
            timeout = max(t for _, t, _ in batch)
        try:
            reply = await self.stub.Score(request, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - every caller in the call sees what it raised
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        start, whole = 0, len(reply.results) == len(request.samples)
        for r, _, fut in batch:
            mine = reply
            if whole and len(batch) > 1:  # else each caller sees the wrong count, and says so
                mine = reward_pb2.ScoreReply(results=reply.results[start : start + len(r.samples)])
            start += len(r.samples)
            if not fut.done():
                fut.set_result(mine)


@dataclass
class Scored:
    reward: float = 0.0
    error: str = ""  # the last error; set only when every attempt failed
    attempts: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.error)


async def score_once(
    reward: reward_pb2_grpc.RewardStub | BatchedReward, samples: list[types_pb2.Sample], timeout: float
) -> list[reward_pb2.ScoreResult]:
    """One `Score` call; a failed call or a malformed reply fails every sample of it, except an
    UNAVAILABLE one: RewardUnavailable."""
    try:
        reply = await reward.Score(reward_pb2.ScoreRequest(samples=samples), timeout=timeout)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            raise RewardUnavailable(e.details() or "reward service unavailable") from None
        error = f"reward service: {e.code().name}: {e.details()}"
        return [reward_pb2.ScoreResult(failed=True, error=error) for _ in samples]
    if len(reply.results) != len(samples):
        error = f"reward service returned {len(reply.results)} results for {len(samples)} samples"
        return [reward_pb2.ScoreResult(failed=True, error=error) for _ in samples]
    return list(reply.results)


async def score_with_retries(
    reward: reward_pb2_grpc.RewardStub | BatchedReward,
    samples: list[types_pb2.Sample],
    timeout: float,
    max_failures: int,
    on_failure: Callable[[types_pb2.Sample, str], None] = lambda sample, error: None,
    gate: RewardGate | None = None,
) -> list[Scored]:
    """Every sample's reward, or its last error after `max_failures` failed attempts. While the
    reward is unavailable, tried again with backoff, no attempt counted (until cancelled)."""
    out = [Scored() for _ in samples]
    pending = list(range(len(samples)))
    backoff, unavailable_backoff = BACKOFF_FIRST_S, UNAVAILABLE_FIRST_S
    while pending:
        try:
            results = await score_once(reward, [samples[i] for i in pending], timeout)
        except RewardUnavailable as e:
            if gate is not None:
                gate.down(str(e))
            log.info(
                "reward unavailable (%s); scoring %d samples again in %.1fs",
                e,
                len(pending),
                unavailable_backoff,
            )
            if gate is None:
                await asyncio.sleep(unavailable_backoff)
            else:
                gate.waiters += 1  # the gate stays down only while someone waits to learn otherwise
                try:
                    await asyncio.sleep(unavailable_backoff)
                finally:
                    gate.waiters -= 1
                    if gate.waiters == 0 and asyncio.current_task().cancelling():
                        gate.forget()
            unavailable_backoff = min(unavailable_backoff * 2, UNAVAILABLE_MAX_S)
            continue
        unavailable_backoff = UNAVAILABLE_FIRST_S
        if gate is not None:
            gate.up()
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
