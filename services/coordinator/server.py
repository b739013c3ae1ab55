"""The coordinator service: admission, leases, group assembly, weight relay, over gRPC.

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

The rooms: this file only translates RPCs. The life of a group is the `Pipeline`
(pipeline.py), which knows no gRPC and reaches out through the `Ports` bound below; the
attached streams are `Streams` (streams.py); the Redis journal and the reloads that rebuild
the pipeline from it are `Recovery` (recovery.py); evaluation rounds (--eval-prompt-data) are the
`Evaluator` (eval.py), which takes the results of its `eval/` items before the pipeline sees them.
Everything runs on one asyncio loop, so none of them needs locks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis

from slipstream import telemetry
from slipstream.algorithms.staleness import StalenessBound
from slipstream.buffer.coordinator_store import CoordinatorCounters, CoordinatorStore, RunFinished
from slipstream.buffer.replay import ReplayBuffer
from slipstream.config import Config
from slipstream.data import load_prompts
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, reward_pb2_grpc, types_pb2
from slipstream.rollout_filters import FilterFn, load_filter
from slipstream.rpc import bursts
from slipstream.rpc.channel import aio_channel, wait_healthy
from slipstream.rpc.convert import sample_to_proto
from slipstream.rpc.server import Service, install_signal_handlers, start_server
from slipstream.services.coordinator.dispatch_log import DispatchLog
from slipstream.services.coordinator.eval import EvalSet, EvalSettings, Evaluator
from slipstream.services.coordinator.journal import Journal
from slipstream.services.coordinator.pipeline import Pipeline, PipelineSettings, Ports
from slipstream.services.coordinator.prompts import Prompts, tokenize_prompts
from slipstream.services.coordinator.recovery import Recovery, RedisLost
from slipstream.services.coordinator.scoring import (
    BatchedReward,
    RewardGate,
    RewardOutage,
    score_with_retries,
)
from slipstream.services.coordinator.streams import Attached, Streams
from slipstream.services.coordinator.weights_relay import (
    PushError,
    VersionNotNewer,
    WeightRelay,
    receive_push,
)
from slipstream.types import Sample

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


def buffer_ports(buffer: ReplayBuffer) -> dict:
    """The pipeline's ports onto the replay buffer (sync Redis: called in worker threads)."""

    async def dead_letter(sample: types_pb2.Sample, reason: str) -> None:
        try:
            await asyncio.to_thread(
                buffer.dead_letter, sample.SerializeToString(), reason, "reward", sample.uid
            )
        except redis.exceptions.RedisError as e:
            log.error("could not dead-letter %s (%s): %s", sample.uid, reason, e)

    async def take_partials(count: int | None) -> list[types_pb2.Sample]:
        if count is None:
            count = await asyncio.to_thread(buffer.num_partials)
        return await asyncio.to_thread(buffer.take_partials, count)

    async def park(sample: types_pb2.Sample) -> None:
        await asyncio.to_thread(buffer.put_partial, sample)

    return dict(dead_letter=dead_letter, park=park, take_partials=take_partials)


@dataclass
class RunningCoordinator:
    service: Service
    servicer: CoordinatorServicer
    reward_channel: grpc.aio.Channel
    buffer: ReplayBuffer
    store: CoordinatorStore
    events: DispatchLog
    reward_gate: RewardGate | None = None

    @property
    def port(self) -> int:
        return self.service.port

    async def stop(self, grace: float = 2.0) -> None:
        await self.service.health.enter_graceful_shutdown()  # probers learn first
        await self.servicer.streams.close()
        await self.servicer.recovery.close()
        if self.reward_gate is not None:
            self.reward_gate.close()
        self.events.close()
        await self.service.stop(grace)
        await self.reward_channel.close()
        self.buffer.close()
        self.store.close()


def _pipeline_settings(cfg: Config, group_filter: FilterFn | None) -> PipelineSettings:
    """What the pipeline reads of the config, resolved once."""
    from slipstream.models.hf import load_config

    checkpoint = Path(cfg.model.hf_checkpoint)  # results are checked against its vocabulary, if it says
    vocab_size = load_config(checkpoint).vocab_size if (checkpoint / "config.json").is_file() else 0
    return PipelineSettings(
        rollout=cfg.rollout,
        bound=StalenessBound.from_config(cfg),
        seed=cfg.train.seed,
        vocab_size=vocab_size,
        group_filter=group_filter,
        filter_args=cfg.as_namespace(),  # what slime hooks receive as `args`
    )


def _evaluator(cfg: Config, streams: Streams, score) -> Evaluator | None:
    """The --eval-prompt-data rounds (None without them); each set's prompts checked like training's."""
    data, rollout = cfg.data, cfg.rollout
    if not data.eval_sets:
        return None
    from slipstream.models.hf import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.hf_checkpoint)
    sets = []
    for name, path in data.eval_sets:
        records = load_prompts(path, data.input_key, data.label_key, data.metadata_key)
        as_data = dataclasses.replace(data, prompt_data=path)
        tokens = tokenize_prompts(tokenizer, records, as_data, rollout.rollout_max_prompt_len)
        templates = [
            sample_to_proto(Sample(prompt=r.prompt, tokens=t, label=r.label, metadata=dict(r.metadata)))
            for r, t in zip(records, tokens, strict=True)
        ]
        sets.append(EvalSet(name, templates))
        log.info("eval set %s: %d prompts from %s", name, len(records), path)
    temperature = rollout.rollout_temperature if data.eval_temperature is None else data.eval_temperature
    sampling = types_pb2.SamplingParams(
        temperature=temperature,
        top_p=rollout.rollout_top_p if data.eval_top_p is None else data.eval_top_p,
        top_k=max(rollout.rollout_top_k, 0),
        max_new_tokens=data.eval_max_response_len or rollout.rollout_max_response_len,
        stop_token_ids=rollout.rollout_stop_token_ids,
    )
    interval = cfg.train.update_weights_interval
    settings = EvalSettings(
        interval=data.eval_interval,
        last_version=rollout.num_rollout // interval,
        n_samples=data.n_samples_per_eval_prompt,
        sampling=sampling,
        run_dir=Path(cfg.infra.run_dir),
        steps_per_version=interval,
        seed=cfg.train.seed,
    )
    return Evaluator(settings, sets, streams.send, lambda: list(streams.conns), score)


async def start_coordinator(cfg: Config) -> RunningCoordinator:
    """Load and check the prompts, connect to the buffer and reward service, then serve.

    Raises `DataError` for unusable prompts and `RunFinished` for a run id whose run is over
    (unless --load) before anything listens.
    """
    from slipstream.models.hf import load_tokenizer

    data, infra, rm = cfg.data, cfg.infra, cfg.reward
    records = load_prompts(data.prompt_data, data.input_key, data.label_key, data.metadata_key)
    tokens = tokenize_prompts(
        load_tokenizer(cfg.model.hf_checkpoint), records, data, cfg.rollout.rollout_max_prompt_len
    )
    log.info("%d prompts from %s", len(records), data.prompt_data)
    spec = cfg.rollout.dynamic_sampling_filter_path
    group_filter = load_filter(spec) if spec else None  # FilterLoadError: one line, before serving
    buffer = ReplayBuffer(infra.redis_connect_url, infra.effective_run_id)
    await asyncio.to_thread(buffer.ping)
    store = CoordinatorStore(infra.redis_connect_url, infra.effective_run_id)
    snapshot = await asyncio.to_thread(store.load)
    if snapshot is not None and snapshot.finished_step is not None and not cfg.train.load:
        buffer.close()
        store.close()
        raise RunFinished(infra.effective_run_id, snapshot.finished_step)
    reward_channel = aio_channel(infra.reward_addr)
    # Started at the same time as the reward service (the launcher, compose): wait as long as
    # any service waits for another.
    await wait_healthy(
        reward_channel,
        timeout=max(infra.rpc_timeout, infra.reconnect_timeout),
        what=f"reward service at {infra.reward_addr}",
    )
    reward = reward_pb2_grpc.RewardStub(reward_channel)
    if not (rm.custom_rm_path or rm.rm_url or rm.rm_type == "remote_rm"):
        # A built-in rule cannot be down: the groups of one turn go in one call. (A remote
        # endpoint down fails a whole call UNAVAILABLE, so there each group keeps a call of its own.)
        reward = BatchedReward(reward)
    score_timeout = max(infra.rpc_timeout, rm.rm_timeout * (rm.rm_max_retries + 1) + 5.0)

    settings = _pipeline_settings(cfg, group_filter)
    prompts = Prompts(records, tokens, shuffle=data.rollout_shuffle, seed=cfg.train.seed)
    relay, streams, trainer, events = (
        WeightRelay(),
        # A fresh run waits for the fleet the launcher started; a resumed one takes who comes back.
        Streams(
            infra.lease_timeout,
            expected_servers=cfg.rollout.rollout_num_servers if snapshot is None else 0,
            grace_s=cfg.rollout.rollout_attach_grace,
        ),
        TrainerProgress(),
        DispatchLog(infra.run_dir),
    )
    gate = RewardGate(rm.reward_outage_timeout)
    ports = Ports(
        send=streams.send,
        capacity=streams.capacity,
        version=lambda: relay.version,
        finished=lambda: trainer.finished,
        score=lambda samples, failed: score_with_retries(
            reward, samples, score_timeout, rm.reward_max_failures, failed, gate
        ),
        resync=lambda: recovery.resync(),
        reward_up=lambda: gate.is_up,
        **buffer_ports(buffer),
    )

    def new_pipeline(counters: CoordinatorCounters, journal: Journal) -> Pipeline:
        return Pipeline(settings, prompts, ports, journal, events, counters)

    recovery = Recovery(store, relay, new_pipeline, infra.reconnect_timeout)
    await recovery.start(snapshot)  # its incarnation is durable before anything is served
    servicer = CoordinatorServicer(relay, streams, recovery, trainer)
    servicer.buffer_depth = lambda: (buffer.num_groups(), buffer.num_pending())
    servicer.evaluator = _evaluator(cfg, streams, ports.score)
    streams.start(on_expired=servicer.detach)
    service = await start_server(
        lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server),
        interceptors=[telemetry.RpcMetrics()],
        host=infra.host,
        port=infra.port,
        ready_file=infra.ready_file,
    )
    return RunningCoordinator(service, servicer, reward_channel, buffer, store, events, gate)


async def serve(cfg: Config) -> None:
    running = await start_coordinator(cfg)
    status, buffer = running.servicer.status, running.buffer
    loop = asyncio.get_running_loop()
    telemetry.watch("coordinator", lambda: telemetry.coordinator_metrics(status()), loop)
    telemetry.watch("buffer", lambda: telemetry.buffer_metrics(buffer))  # sync Redis: off the event loop
    telemetry.serve_metrics(cfg.infra.host, cfg.infra.metrics_port)
    install_signal_handlers(running.stop)
    recovery = running.servicer.recovery
    recovery.on_fatal = lambda: asyncio.ensure_future(running.stop())
    running.reward_gate.on_fatal = lambda: asyncio.ensure_future(running.stop())
    await running.service.server.wait_for_termination()
    if recovery.fatal:
        raise RedisLost(recovery.fatal)
    if running.reward_gate.fatal:
        raise RewardOutage(running.reward_gate.fatal)
