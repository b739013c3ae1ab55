"""The training loop, top to bottom: pull groups -> advantages -> train -> ack -> push weights.

    for step in range(start, num_rollout):
        groups   = buffer.read_groups(...)          # wait for rollout_batch_size scored groups
        adv      = grpo_advantages(rewards)         # per group
        stats    = actor.train_rollout(samples)     # recompute old log-probs, optimizer steps
        buffer.ack(ids)                             # only now: the step that used them is done
        push weights every --update-weights-interval steps (a new policy version)
        report progress to the coordinator (admission control), write metrics.jsonl

Entries are acknowledged only after the optimizer step that consumed them; a trainer that dies
before that leaves them pending in the consumer group, where they can be reclaimed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from slipstream.algorithms.advantages import grpo_advantages
from slipstream.buffer.replay import ReplayBuffer
from slipstream.config import Config
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from slipstream.rpc.channel import sync_channel, wait_healthy_sync
from slipstream.rpc.convert import sample_from_proto
from slipstream.types import Sample, Status

from .actor import Actor
from .batch import trainable
from .checkpoint import load_trainer_state, resolve_checkpoint, save_checkpoint
from .metrics import MetricsLog, group_metrics
from .weight_push import push_weights

log = logging.getLogger("slipstream.trainer")


@dataclass
class TrainerState:
    step: int = 0
    policy_version: int = 0
    num_groups_consumed: int = 0
    finished: bool = False
    stop: threading.Event = field(default_factory=threading.Event)


def _collect(
    buffer: ReplayBuffer, consumer: str, count: int, state: TrainerState
) -> list[tuple[str, types_pb2.Group]]:
    got: list[tuple[str, types_pb2.Group]] = []
    while len(got) < count and not state.stop.is_set():
        got.extend(buffer.read_groups(consumer, count - len(got), block_ms=500))
    return got


def _advantages(groups: list[list[Sample]], cfg: Config) -> list[list[float]]:
    rewards = torch.tensor([[s.get_reward_value() if trainable(s) else 0.0 for s in g] for g in groups])
    adv = grpo_advantages(rewards, normalize_std=not cfg.algo.disable_grpo_std_normalization)
    return adv.tolist()


def _await_rollout_versions(coordinator, version: int, timeout: float) -> coordinator_pb2.CoordinatorStatus:
    """At the end of a run, give rollout servers a moment to apply the last version (for the record)."""
    deadline = time.monotonic() + 60.0
    while True:
        status = coordinator.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=timeout)
        if all(v >= version for v in status.server_versions.values()) or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def train(cfg: Config, state: TrainerState) -> None:
    torch.manual_seed(cfg.train.seed)
    buffer = ReplayBuffer(cfg.infra.redis_url, cfg.run_id)
    channel = sync_channel(cfg.infra.coordinator_addr)
    wait_healthy_sync(channel, timeout=60, what=f"coordinator at {cfg.infra.coordinator_addr}")
    coordinator = coordinator_pb2_grpc.CoordinatorStub(channel)
    actor = Actor(cfg)
    metrics = MetricsLog(cfg.infra.run_dir)
    consumer = "trainer-0"

    if cfg.train.load:
        ckpt = resolve_checkpoint(cfg.train.load)
        actor = Actor(cfg, model_path=str(ckpt))
        saved = load_trainer_state(ckpt, actor.model, actor.optimizer)
        state.step, state.policy_version = saved["step"], saved["policy_version"]
        state.num_groups_consumed = saved.get("num_groups_consumed", 0)
        log.info("resumed from %s at step %d (policy v%d)", ckpt, state.step, state.policy_version)
        if state.policy_version > 0:
            push_weights(
                coordinator,
                actor.state_dict_for_sync(),
                state.policy_version,
                cfg.train.weight_sync_dtype,
                cfg.infra.rpc_timeout,
            )

    def checkpoint(step: int) -> None:
        save_checkpoint(
            cfg.save_dir,
            step,
            actor.model,
            actor.optimizer,
            {
                "policy_version": state.policy_version,
                "num_groups_consumed": state.num_groups_consumed,
            },
            tokenizer_dir=cfg.model.hf_checkpoint,
        )

    for step in range(state.step, cfg.rollout.num_rollout):
        t0 = time.perf_counter()
        entries = _collect(buffer, consumer, cfg.rollout.rollout_batch_size, state)
        if state.stop.is_set():
            log.info("stop requested; leaving %d read entries unacknowledged", len(entries))
            break
        t_data = time.perf_counter()
        groups = [[sample_from_proto(p) for p in g.samples] for _, g in entries]
        advantages = _advantages(groups, cfg)
        samples = [s for g in groups for s in g]
        flat_adv = [a for g in advantages for a in g]
        stats = actor.train_rollout(samples, flat_adv)
        t_compute = time.perf_counter()

        buffer.ack([entry_id for entry_id, _ in entries])
        state.num_groups_consumed += len(entries)
        trained_version = state.policy_version
        push_s = 0.0
        if (step + 1) % cfg.train.update_weights_interval == 0:
            state.policy_version += 1
            push_s, _ = push_weights(
                coordinator,
                actor.state_dict_for_sync(),
                state.policy_version,
                cfg.train.weight_sync_dtype,
                cfg.infra.rpc_timeout,
            )
        state.step = step + 1
        coordinator.ReportProgress(
            coordinator_pb2.TrainerProgress(
                step=state.step,
                num_groups_consumed=state.num_groups_consumed,
                finished=state.step >= cfg.rollout.num_rollout,
            ),
            timeout=cfg.infra.rpc_timeout,
        )
        if cfg.train.save_interval and state.step % cfg.train.save_interval == 0:
            checkpoint(state.step)
        t_end = time.perf_counter()

        metrics.write(
            step=state.step,
            policy_version=state.policy_version,
            **group_metrics(samples, trained_version),
            logprob_abs_diff_mean=stats.logprob_abs_diff_mean,
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            pg_clipfrac=stats.pg_clipfrac,
            tis_mean=stats.tis_mean,
            tokens_per_s=stats.num_tokens / max(t_end - t0, 1e-9),
            wait_data_s=t_data - t0,
            compute_s=t_compute - t_data,
            push_weights_s=push_s,
            num_optimizer_steps=stats.num_optimizer_steps,
            num_failed=sum(s.status is Status.FAILED for s in samples),
        )

    checkpoint(state.step)
    state.finished = state.step >= cfg.rollout.num_rollout
    status = _await_rollout_versions(coordinator, state.policy_version, cfg.infra.rpc_timeout)
    metrics.write_summary(
        finished=state.finished,
        policy_version=state.policy_version,
        num_groups_consumed=state.num_groups_consumed,
        rollout_server_versions=dict(status.server_versions),
        num_reward_failures=status.num_reward_failures,
    )
    buffer.close()
    channel.close()
