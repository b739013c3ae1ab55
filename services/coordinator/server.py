"""The coordinator service assembled: prompts, the replay buffer, the reward channel, the journal,
the pipeline and its recovery, the rollout streams and the evaluator, built from the config and
served (`start_coordinator`, `serve`). What each RPC does, and the story of a group from
admission to the buffer, is `servicer.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
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
from slipstream.proto import coordinator_pb2_grpc, reward_pb2_grpc, types_pb2
from slipstream.rollout_filters import FilterFn, load_filter
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
from slipstream.services.coordinator.servicer import CoordinatorServicer, TrainerProgress
from slipstream.services.coordinator.streams import Streams
from slipstream.services.coordinator.weights_relay import WeightRelay
from slipstream.types import Sample

log = logging.getLogger(__name__)


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
            count = await asyncio.to_thread(buffer.partials.count)
        return await asyncio.to_thread(buffer.partials.take, count)

    async def park(sample: types_pb2.Sample) -> None:
        await asyncio.to_thread(buffer.partials.put, sample)

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
