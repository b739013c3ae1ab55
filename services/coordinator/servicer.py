"""The coordinator's RPCs: admission, leases, group assembly and the weight relay, over gRPC.

Rollout servers dial in and hold one `Attach` stream each. The coordinator turns prompts
into GRPO groups (one prompt x `n_samples_per_prompt` samples), leases the samples of a
group to the least-loaded server with room for them, and collects results. When the last
sample of a group is in, the group is scored with one `Reward.Score` call and appended to
the replay buffer. A new group is admitted only while the staleness bound allows it, is
generated on weights at least as new as the version it was admitted under, and is stored in
deadline order (`admission.py`); a stream that ends gives its leases back and they are
re-dispatched.

Partial rollout: a sample that comes back ABORTED (its server swapped weights with
`--pause-generation-mode abort`, or over-sampling filled the batch and the coordinator
aborted what still ran) is written to the buffer's partial stream in Redis and, before any
new prompt is admitted, taken back and re-dispatched to continue under the newest weights.
With `--dynamic-sampling-filter-path` a finished group the filter rejects is counted and
dropped, and another prompt takes its place.

Weights pushed by the trainer are checked and kept (`weights_relay.py`); every attached
server is told the new version once its manifest passed and pulls it with `FetchWeights`, which
streams chunks while the push is still arriving (cut-through) and fails if the push does not land.
A push of a version the coordinator already holds is refused with ALREADY_EXISTS (the trainer
reads that code: its weights are there); any other refusal is INVALID_ARGUMENT.

Only translation lives here: the life of a group is the `Pipeline` (pipeline.py), the attached
streams are `Streams` (streams.py), the pipeline in charge is `Recovery`'s (recovery.py), and
evaluation rounds are the `Evaluator`'s (eval.py), which takes the results of its `eval/` items
before the pipeline sees them. Everything runs on one asyncio loop, so none of them needs locks.
`server.py` assembles them and serves this.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import redis

from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc
from slipstream.rpc import bursts
from slipstream.services.coordinator.eval import Evaluator
from slipstream.services.coordinator.pipeline import Pipeline
from slipstream.services.coordinator.recovery import Recovery
from slipstream.services.coordinator.streams import Attached, Streams
from slipstream.services.coordinator.weights_relay import (
    PushError,
    VersionNotNewer,
    WeightRelay,
    receive_push,
)

log = logging.getLogger(__name__)


@dataclass
class TrainerProgress:
    """What the trainer reported (ReportProgress); it outlives any one pipeline."""

    step: int = 0  # the last step it reported
    finished: bool = False  # its last step is done: no new groups


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    # (groups in the buffer stream, entries pending) for GetStatus; set where the buffer is known.
    buffer_depth: Callable[[], tuple[int, int]] | None = None
    evaluator: Evaluator | None = None  # --eval-prompt-data rounds (eval.py)

    def __init__(self, relay: WeightRelay, streams: Streams, recovery: Recovery, trainer: TrainerProgress):
        self.relay = relay
        self.streams = streams
        self.recovery = recovery
        self.trainer = trainer

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline in charge now (a Redis reload puts a new one in charge)."""
        return self.recovery.pipeline

    # ---- rollout servers ---------------------------------------------------------------
    async def Attach(self, request_iterator, context):
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first Attach message must be Hello")
        hello = first.hello
        if hello.max_concurrent_samples <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Hello.max_concurrent_samples must be positive"
            )
        server_id = hello.server_id or context.peer()
        conn = self.streams.attach(server_id, hello.max_concurrent_samples, hello.policy_version)
        conn.host_id = hello.host_id
        log.info(
            "rollout server %s attached (capacity %d, version %d)",
            server_id,
            conn.max_concurrent,
            conn.version,
        )
        if self.relay.held and self.relay.version > conn.version:  # not held: told when it is pushed
            conn.outbox.put_nowait(
                coordinator_pb2.RolloutCommand(
                    new_weights=coordinator_pb2.NewWeights(version=self.relay.version)
                )
            )
        reader = asyncio.create_task(self._read_events(conn, request_iterator))
        self.pipeline.dispatch()
        if self.evaluator is not None:
            self.evaluator.on_attach()
            self.evaluator.poke(self.relay.version)
        try:
            async for cmd in bursts.coalesced(conn.outbox, "work", "work_batch"):
                yield cmd
        finally:
            reader.cancel()
            self.detach(conn)

    async def _read_events(self, conn: Attached, events) -> None:
        try:
            async for event in events:
                self._on_event(conn, event)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            log.info("stream of %s broke: %s", conn.server_id, e)
        finally:
            conn.outbox.put_nowait(None)

    def _on_event(self, conn: Attached, event: coordinator_pb2.RolloutEvent) -> None:
        conn.last_seen = time.monotonic()  # any event renews the stream's leases
        kind = event.WhichOneof("kind")
        if kind in ("result", "results"):
            results = bursts.items(event, "result", "results")
            if self.evaluator is not None:
                results = [r for r in results if not self.evaluator.on_result(conn.conn_id, r)]
            self.pipeline.on_results(conn.conn_id, results)
        elif kind == "heartbeat":
            conn.on_heartbeat(event.heartbeat)
            if self.streams.fleet_opened_now():  # the grace for the rest of the fleet ran out
                self.pipeline.dispatch()
        elif kind == "weights_applied":
            w = event.weights_applied
            if w.ok:
                conn.version = w.version
                log.info("%s serves version %d (%.2fs)", conn.server_id, w.version, w.seconds)
            else:
                log.warning("%s could not apply version %d: %s", conn.server_id, w.version, w.error)
                held = self.relay.byte_form_of
                if conn.host_id and held is not None and held.version == w.version:
                    conn.host_id = ""  # it cannot read versions by reference: the trainer sends bytes
        else:
            log.warning("ignoring an unexpected %s event from %s", kind, conn.server_id)

    def detach(self, conn: Attached) -> None:
        if self.streams.detach(conn):
            if self.evaluator is not None:
                self.evaluator.on_detach(conn.conn_id)
            released = self.pipeline.on_detach(conn.conn_id)
            log.info("rollout server %s detached; %d samples go to other servers", conn.server_id, released)

    # ---- weights -----------------------------------------------------------------------
    async def PushWeights(self, request_iterator, context):
        # Servers are told of the version as soon as its manifest passed the relay's checks, and
        # fetch it while it arrives (cut-through, weights_relay.py): their fetch ends only once
        # this push committed, or fails if it does not.
        notice = coordinator_pb2.RolloutCommand()
        notified: set[str] = set()
        incoming = None

        def announce(version) -> None:
            nonlocal incoming
            incoming = version
            self.relay.begin(version)
            notice.new_weights.version = version.version
            self._notify(notice, notified)

        try:
            stored = await receive_push(
                request_iterator, self.relay.floor, on_manifest=announce, byte_form_of=self.relay.byte_form_of
            )
            self.relay.commit(stored)
        except PushError as e:
            self.relay.abandon(incoming)
            log.warning("weight push refused: %s", e)
            held = isinstance(e, VersionNotNewer)  # the trainer reads the code, not the text
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS if held else grpc.StatusCode.INVALID_ARGUMENT, str(e)
            )
        except BaseException:
            self.relay.abandon(incoming)
            raise
        self._notify(notice, notified)  # those attached while the version streamed in
        log.info(
            "weights version %d received (%d bytes), %d servers notified",
            stored.version,
            stored.total_bytes,
            len(notified),
        )
        # The new version opens the staleness window: the admissions it allows (a whole step's
        # work items on the CPU mesh) go out just after this reply, which the trainer's step
        # waits for, not before it (issue 14).
        asyncio.get_running_loop().call_soon(self._on_new_version, stored.version)
        return coordinator_pb2.PushWeightsReply(version=stored.version, num_servers_notified=len(notified))

    def _on_new_version(self, version: int) -> None:
        self.pipeline.on_new_version()
        if self.evaluator is not None:
            self.evaluator.poke(version)

    def _notify(self, notice: coordinator_pb2.RolloutCommand, notified: set[str]) -> None:
        for conn_id in list(self.streams.conns):
            if conn_id not in notified:
                self.streams.send(conn_id, notice)
                notified.add(conn_id)

    async def FetchWeights(self, request, context):
        stored = self.relay.lookup(request.version)
        if stored is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"weights version {request.version} not held (latest is {self.relay.version})",
            )
        try:
            async for msg in stored.stream():
                yield msg
        except PushError as e:  # the version was streaming in and its push failed: nothing lands
            await context.abort(grpc.StatusCode.ABORTED, str(e))

    # ---- trainer and status ------------------------------------------------------------
    async def ReportProgress(self, request, context):
        self.trainer.step = max(self.trainer.step, request.step)
        self.streams.measure_idle()
        if request.finished and not self.trainer.finished:
            self.trainer.finished = True
            log.info("trainer finished at step %d; no new groups", request.step)
            try:  # durable: this run id started again without --load is refused, not resumed
                await asyncio.to_thread(self.recovery.store.mark_finished, request.step)
            except redis.exceptions.RedisError as e:
                log.warning("could not record in Redis that the run finished: %s", e)
        self.pipeline.dispatch()
        return self.status()

    async def GetStatus(self, request, context):
        status = self.status()
        if self.buffer_depth is not None:  # Redis, off the event loop; progress replies skip it
            try:
                groups, pending = await asyncio.to_thread(self.buffer_depth)
            except redis.exceptions.RedisError:
                return status  # without the buffer: the status answers anyway
            status.buffer.CopyFrom(coordinator_pb2.BufferStatus(num_groups=groups, num_pending=pending))
        return status

    def status(self) -> coordinator_pb2.CoordinatorStatus:
        pipeline = self.pipeline
        c = pipeline.counters
        now = time.monotonic()
        return coordinator_pb2.CoordinatorStatus(
            policy_version=self.relay.version,
            num_groups_dispatched=c.cursor,
            num_groups_completed=c.num_stored,
            num_samples_in_flight=pipeline.num_in_flight,
            num_rollout_servers=len(self.streams),
            server_versions=self.streams.server_versions(),
            finished=self.trainer.finished,
            num_reward_failures=c.num_reward_failures,
            num_partials_recycled=c.num_partials_recycled,
            num_groups_filtered=c.num_filtered,
            num_stale_samples=c.num_stale_samples,
            rollout_idle_fraction=self.streams.idle_fraction,
            weights_held=self.relay.held,
            trainer_step=self.trainer.step,
            max_staleness=pipeline.bound.max_staleness,
            num_dead_lettered=c.num_dead_lettered,
            servers=[
                coordinator_pb2.RolloutServerStatus(
                    server_id=conn.server_id,
                    policy_version=conn.version,
                    num_in_flight=pipeline.ledger.in_flight(conn.conn_id),
                    max_concurrent=conn.max_concurrent,
                    idle_fraction=conn.idle_s / conn.uptime_s if conn.uptime_s > 0 else 0.0,
                    seconds_since_heard=now - conn.last_seen,
                    host_id=conn.host_id,
                )
                for conn in self.streams.conns.values()
            ],
        )
