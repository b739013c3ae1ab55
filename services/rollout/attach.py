"""The coordinator client: how training work reaches a rollout server, over one `Attach` stream.

Training work does not come in as RPCs to this server. The server dials the coordinator and
holds one `Attach` stream: it says `Hello` (who it is, which weights it serves, how many
samples it wants in flight), then receives `WorkItem`s and `NewWeights` notices and sends
back results, heartbeats and `WeightsApplied`. Scaling rollout is starting or stopping
servers; the coordinator re-dispatches the leases of a stream that breaks, so on a break
this side aborts what it was generating for that stream and reconnects with backoff, and gives
up (`CoordinatorLost`) once the coordinator stayed away past --reconnect-timeout.

A work item starts only once the engine serves at least its `min_policy_version`; the
coordinator can also abort items (`AbortWork`, over-sampling). A new weight version is fetched,
staged and verified completely (`weights_fetch.py`), and only then handed to the engine thread,
which swaps it in between two decode steps; the old one keeps serving throughout, and a version
that cannot be fetched is reported and dropped. What the swap does to work in flight is the
partial-rollout mode (`version_gate.py`): drain (default: finish on the old weights, then swap),
abort (with `--partial-rollout`: stop, send each partial back ABORTED, swap) or in_place (swap
between decode steps, keep the KV cache).

Everything here runs on the server's event loop; the engine is reached through the worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slipstream import telemetry
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from slipstream.services.rollout.samples import Tokenizer, finish_sample, make_request, with_status
from slipstream.services.rollout.settings import ServerConfig
from slipstream.services.rollout.version_gate import VersionGate
from slipstream.services.rollout.weights_fetch import Staged, WeightFetcher, WeightFetchError
from slipstream.services.rollout.worker import EngineWorker

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 5.0  # backoff; the give-up window is --reconnect-timeout


@dataclass
class _Work:
    """An attached work item on this server: its engine request id, and whether it was aborted."""

    rid: str
    aborted: bool = False
    submitted: bool = False

    @classmethod
    def of(cls, item: coordinator_pb2.WorkItem) -> _Work:
        return cls(rid=f"{item.work_id}#{item.lease_epoch}")  # unique even when a lease is re-issued


class CoordinatorLost(RuntimeError):
    """The coordinator stayed unreachable past the reconnect window."""


class CoordinatorClient:
    def __init__(
        self,
        settings: ServerConfig,
        coordinator: grpc.aio.Channel,
        worker: EngineWorker,
        tokenizer: Tokenizer,
        fetcher: WeightFetcher,
        stopping: asyncio.Event,
    ):
        """`stopping`: set to end the stream and everything in flight (the server's shutdown)."""
        self.settings = settings
        self.coordinator = coordinator
        self.worker = worker
        self.tokenizer = tokenizer
        self.fetcher = fetcher
        self.stopping = stopping
        self._outbox: asyncio.Queue | None = None  # events for the live Attach stream
        self._attached_rids: set[str] = set()  # engine requests of the live stream
        self._work: dict[str, _Work] = {}  # work id -> attached work item not yet answered
        self.gate = VersionGate(lambda: self.worker.policy_version)
        self._weights_lock = asyncio.Lock()
        self._newest_notice = 0  # the newest version the coordinator announced
        self._tasks: set[asyncio.Task] = set()

    # ---- the stream ----------------------------------------------------------------------
    async def attach_forever(self) -> None:
        """Hold an Attach stream, reconnecting with backoff; `CoordinatorLost` after --reconnect-timeout down.

        A restarted coordinator (same address) is simply attached to again: it re-dispatches what
        this server was generating, under new epochs.
        """
        health = health_pb2_grpc.HealthStub(self.coordinator)
        down_since: float | None = None
        backoff = RECONNECT_FIRST
        while not self.stopping.is_set():
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    raise ConnectionError("coordinator not serving")
                down_since, backoff = None, RECONNECT_FIRST
                reason = await self._attach_once()
            except (grpc.aio.AioRpcError, ConnectionError) as e:
                reason = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            if self.stopping.is_set():
                return
            now = time.monotonic()
            down_since = down_since or now
            give_up = self.settings.reconnect_timeout
            if now - down_since >= give_up:
                raise CoordinatorLost(
                    f"coordinator at {self.settings.coordinator_addr} unreachable for "
                    f"{give_up:.0f}s (--reconnect-timeout; {reason})"
                )
            log.warning("coordinator stream down (%s); retrying in %.1fs", reason, backoff)
            try:
                await asyncio.wait_for(self.stopping.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, RECONNECT_MAX)

    async def _attach_once(self) -> str:
        """One Attach stream, until it ends; returns why it ended."""
        outbox: asyncio.Queue = asyncio.Queue()
        outbox.put_nowait(
            coordinator_pb2.RolloutEvent(
                hello=coordinator_pb2.Hello(
                    server_id=self.settings.server_id,
                    policy_version=self.worker.policy_version,
                    max_concurrent_samples=self.settings.max_concurrent_samples,
                )
            )
        )

        async def events():
            while (event := await outbox.get()) is not None:
                yield event

        stub = coordinator_pb2_grpc.CoordinatorStub(self.coordinator)
        call = stub.Attach(events())
        self._outbox = outbox
        heartbeat = asyncio.create_task(self._heartbeat(outbox))
        stop_wait = asyncio.create_task(self.stopping.wait())
        stop_wait.add_done_callback(lambda _t: call.cancel())
        log.info("attached to coordinator %s as %s", self.settings.coordinator_addr, self.settings.server_id)
        try:
            async for cmd in call:
                self._on_command(cmd, outbox)
            return "the coordinator ended the stream"
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self.stopping.is_set():
                return "stopping"
            return f"{e.code().name}: {e.details()}"
        finally:
            stop_wait.cancel()
            heartbeat.cancel()
            outbox.put_nowait(None)
            self._outbox = None
            # The coordinator re-dispatches this stream's leases: stop generating them here.
            if self._attached_rids:
                self.worker.abort(list(self._attached_rids))
                self._attached_rids.clear()
            if self._work:  # items still waiting at the gate: let them go
                self._abort_work(list(self._work))

    async def _heartbeat(self, outbox: asyncio.Queue) -> None:
        while True:  # the first one at once: the coordinator's baseline for idle time
            outbox.put_nowait(
                coordinator_pb2.RolloutEvent(
                    heartbeat=coordinator_pb2.Heartbeat(
                        policy_version=self.worker.policy_version,
                        num_running=self.worker.num_running,
                        idle_seconds=self.worker.idle_seconds,
                        uptime_seconds=self.worker.uptime_seconds,
                    )
                )
            )
            await asyncio.sleep(HEARTBEAT_SECONDS)

    def _on_command(self, cmd: coordinator_pb2.RolloutCommand, outbox: asyncio.Queue) -> None:
        kind = cmd.WhichOneof("kind")
        if kind == "work":
            item = cmd.work
            # Registered now, not in the task: an AbortWork right behind it must find it.
            self._work[item.work_id] = _Work.of(item)
            self._spawn(self._serve_work(item, outbox))
        elif kind == "new_weights":
            self._newest_notice = max(self._newest_notice, cmd.new_weights.version)
            self._spawn(self._apply_weights(cmd.new_weights.version))
        elif kind == "abort":
            self._abort_work(list(cmd.abort.work_ids))
        elif kind == "shutdown":
            log.info("the coordinator asked this server to shut down")
            self.stopping.set()
        else:
            log.warning("ignoring an unknown command from the coordinator")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- work items ----------------------------------------------------------------------
    def _abort_work(self, work_ids: list[str]) -> None:
        """Stop these items: running ones return their partial, waiting ones return unchanged."""
        running = []
        for work_id in work_ids:
            work = self._work.get(work_id)
            if work is None:
                continue  # already answered
            work.aborted = True
            if work.submitted:
                running.append(work.rid)
        if running:
            self.worker.abort(running)
        self._spawn(self.gate.poke())

    async def _serve_work(self, item: coordinator_pb2.WorkItem, outbox: asyncio.Queue) -> None:
        work = self._work.setdefault(item.work_id, _Work.of(item))
        try:
            if not await self.gate.enter(item.min_policy_version, lambda: work.aborted):
                sample = with_status(item.sample, types_pb2.SAMPLE_STATUS_ABORTED)
            else:
                try:
                    sample = await self._generate_one(item, work)
                finally:
                    await self.gate.leave()
        finally:
            if self._work.get(item.work_id) is work:  # a re-issued lease may have replaced it
                del self._work[item.work_id]
        outbox.put_nowait(
            coordinator_pb2.RolloutEvent(
                result=coordinator_pb2.SampleResult(
                    work_id=item.work_id, lease_epoch=item.lease_epoch, sample=sample
                )
            )
        )

    async def _generate_one(self, item: coordinator_pb2.WorkItem, work: _Work) -> types_pb2.Sample:
        if item.sampling.max_new_tokens <= 0 and item.sample.response_length > 0:
            # A continued sample with no budget left is already complete.
            return with_status(item.sample, types_pb2.SAMPLE_STATUS_TRUNCATED)
        rid = work.rid  # "<work id>#<epoch>"
        try:
            request = make_request(rid, item.sample, item.sampling, self.settings.default_max_new_tokens)
            self._attached_rids.add(rid)
            try:
                future = self.worker.submit(request)
                work.submitted = True
                if work.aborted:  # the abort came while it was passing the gate
                    self.worker.abort([rid])
                result = await future
            finally:
                self._attached_rids.discard(rid)
        except ValueError as e:
            # Unusable work (bad parameters, refused by the engine): answer FAILED, do not sit on the lease.
            log.error("work item %s refused: %s", item.work_id, e)
            return with_status(item.sample, types_pb2.SAMPLE_STATUS_FAILED)
        return finish_sample(item.sample, result, self.tokenizer)

    # ---- weight versions -----------------------------------------------------------------
    async def _apply_weights(self, version: int) -> None:
        """Fetch, stage and verify `version`, then swap it in; report the outcome either way."""
        async with self._weights_lock:  # versions are applied one at a time, in order
            current = self.worker.policy_version
            if version <= current:
                return
            t0 = time.monotonic()
            try:
                staged = await self.fetcher.fetch(version, current, newest=lambda: self._newest_notice)
            except WeightFetchError as e:
                error, wire_format = str(e), ""
            else:
                error, wire_format = await self._swap(staged), staged.format
            seconds = time.monotonic() - t0
            telemetry.WEIGHT_APPLY_SECONDS.labels(ok=str(not error).lower()).observe(seconds)
            if error:
                log.warning("weights version %d refused, still serving %d: %s", version, current, error)
            else:
                log.info("now serving weights version %d (%s, %.2fs)", version, wire_format, seconds)
            if self._outbox is not None:
                self._outbox.put_nowait(
                    coordinator_pb2.RolloutEvent(
                        weights_applied=coordinator_pb2.WeightsApplied(
                            version=version, ok=not error, error=error, seconds=seconds
                        )
                    )
                )

    async def _swap(self, staged: Staged) -> str:
        """Swap a staged version in, per the pause mode; '' or why the engine refused it."""
        pause_mode = self.settings.pause_mode
        try:
            async with self.gate.swapping(drain=pause_mode == "drain"):
                if pause_mode == "abort" and self._attached_rids:
                    # Each comes back ABORTED with what it generated; the coordinator
                    # continues it under the new weights. The engine thread runs the abort
                    # before the swap, so every token it kept is of the old version.
                    self.worker.abort(list(self._attached_rids))
                await self.worker.load_weights(staged.tensors, staged.version)
        except ValueError as e:  # the engine refusing a name/shape
            return str(e)
        return ""

    async def close(self) -> None:
        self.stopping.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
