"""The training loop, top to bottom: pull groups -> staleness -> advantages -> train -> commit -> push.

    for step in range(start, num_rollout):
        groups   = fresh groups, topped up with reused ones (--max-reuse) when fresh are short
        samples  = apply_staleness_policy(...)      # --max-staleness, --stale-sample-policy,
                                                    # --mask-offpolicy-in-partial-rollout
        scores   = group_scores(rewards)            # per group, per --advantage-estimator
        stats    = actor.train_rollout(samples)     # old/ref log-probs, advantages, optimizer steps
        buffer.commit(ids, requeue)                 # only now: the step that used them is done
        push weights every --update-weights-interval steps (a new policy version)
        report progress to the coordinator (admission control), write metrics.jsonl

Entries are acknowledged only after the optimizer step that consumed them; a trainer that dies
before that leaves them pending in the consumer group, where they can be reclaimed. The same
MULTI/EXEC requeues the groups that may be trained again: fewer than --max-reuse trainings so
far and still within --max-staleness of the next version.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slipstream.algorithms.advantages import group_scores
from slipstream.algorithms.staleness import apply_staleness_policy
from slipstream.buffer.replay import ReplayBuffer, ReusedGroup
from slipstream.config import Config
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from slipstream.rpc.channel import sync_channel, wait_healthy_sync
from slipstream.rpc.convert import sample_from_proto, sample_to_proto
from slipstream.types import Sample, Status

from .actor import Actor
from .batch import trainable
from .checkpoint import load_trainer_state, resolve_checkpoint, save_checkpoint
from .metrics import MetricsLog, coordinator_counters, group_metrics
from .parallel import Parallel, broadcast_bytes
from .weight_push import push_weights

log = logging.getLogger("slipstream.trainer")


@dataclass
class TrainerState:
    step: int = 0
    policy_version: int = 0
    num_groups_consumed: int = 0  # fresh groups acknowledged (each once)
    num_group_trainings: int = 0  # groups trained, reuses included
    wait_data_s: float = 0.0  # time spent waiting for data, over the run
    busy_s: float = 0.0  # wall time of steps, over the run
    finished: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    observers: list[Callable[[dict], None]] = field(default_factory=list)  # get each step's metrics row


def _group_staleness(group: types_pb2.Group, version: int) -> int:
    oldest = min((min(s.policy_versions) for s in group.samples if s.policy_versions), default=version)
    return version - oldest


@dataclass
class StepGroups:
    """The groups of one step: fresh (stream ids to ack) and reused (to delete), plus expired reuses."""

    fresh: list[tuple[str, types_pb2.Group]] = field(default_factory=list)
    reused: list[ReusedGroup] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)  # reuse entries too stale to train: deleted

    def __len__(self) -> int:
        return len(self.fresh) + len(self.reused)

    def trained(self) -> list[tuple[types_pb2.Group, int]]:
        """(group, times trained before this step), fresh first."""
        return [(g, 0) for _, g in self.fresh] + [(r.group, r.times_trained) for r in self.reused]


def _collect(buffer: ReplayBuffer, consumer: str, count: int, state: TrainerState, cfg: Config) -> StepGroups:
    """`count` groups: fresh ones first; reused ones (oldest first) only to fill what fresh cannot now."""
    batch = StepGroups()
    reuse = cfg.train.max_reuse > 1
    while len(batch) < count and not state.stop.is_set():
        batch.fresh += buffer.read_groups(consumer, count - len(batch), block_ms=0)
        if reuse and len(batch) < count:
            for r in buffer.read_reuse(consumer, count - len(batch)):
                if _group_staleness(r.group, state.policy_version) > cfg.rollout.max_staleness:
                    batch.expired.append(r.entry_id)
                else:
                    batch.reused.append(r)
        if len(batch) < count:
            batch.fresh += buffer.read_groups(consumer, count - len(batch), block_ms=500)
    return batch


def _requeue(batch: StepGroups, cfg: Config, next_version: int) -> list[tuple[types_pb2.Group, int]]:
    """Groups to train again: fewer than --max-reuse trainings, within --max-staleness of the next version."""
    return [
        (g, times + 1)
        for g, times in batch.trained()
        if times + 1 < cfg.train.max_reuse and _group_staleness(g, next_version) <= cfg.rollout.max_staleness
    ]


def _reuse_capacity(cfg: Config) -> int:
    """Reuse entries worth keeping: a step requeues at most a batch, and a group requeued more
    than max_staleness + 1 steps ago is past the bound by the time it could be read."""
    return (cfg.rollout.max_staleness + 1) * cfg.rollout.rollout_batch_size


def _scores(groups: list[list[Sample]], cfg: Config) -> list[list[float]]:
    rewards = torch.tensor([[s.get_reward_value() if trainable(s) else 0.0 for s in g] for g in groups])
    a = cfg.algo
    return group_scores(
        rewards, a.advantage_estimator, normalize_std=not a.disable_grpo_std_normalization
    ).tolist()


def _await_rollout_versions(coordinator, version: int, timeout: float) -> coordinator_pb2.CoordinatorStatus:
    """At the end of a run, give rollout servers a moment to apply the last version (for the record)."""
    deadline = time.monotonic() + 60.0
    while True:
        status = coordinator.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=timeout)
        if all(v >= version for v in status.server_versions.values()) or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def _share_step(
    par: Parallel, samples: list[Sample] | None, scores: list[float] | None, stop: bool, trained_version: int
) -> tuple[list[Sample], list[float], bool, int]:
    """Rank 0's step (or its decision to stop) on every rank; protobuf bytes, never pickles."""
    if not par.enabled:
        return samples or [], scores or [], stop, trained_version
    head = par.broadcast_floats([float(stop), float(trained_version)] if par.is_main else None)
    if head[0]:
        return [], [], True, int(head[1])
    payload = (
        types_pb2.Group(samples=[sample_to_proto(x) for x in samples]).SerializeToString()
        if par.is_main
        else None
    )
    group = types_pb2.Group.FromString(broadcast_bytes(payload, par))
    return [sample_from_proto(p) for p in group.samples], par.broadcast_floats(scores), False, int(head[1])


def train(cfg: Config, state: TrainerState) -> None:
    torch.manual_seed(cfg.train.seed)
    ckpt = resolve_checkpoint(cfg.train.load) if cfg.train.load else None
    actor = Actor(cfg, model_path=str(ckpt) if ckpt else None)
    par = actor.par
    if ckpt:
        saved = load_trainer_state(ckpt, actor.model, actor.optimizer)
        state.step, state.policy_version = saved["step"], saved["policy_version"]
        state.num_groups_consumed = saved.get("num_groups_consumed", 0)
        state.num_group_trainings = saved.get("num_group_trainings", state.num_groups_consumed)
        log.info("resumed from %s at step %d (policy v%d)", ckpt, state.step, state.policy_version)
    if not par.is_main:
        return _follow(cfg, state, actor)
    buffer = ReplayBuffer(cfg.redis_connect_url, cfg.run_id)
    channel = sync_channel(cfg.infra.coordinator_addr)
    wait_healthy_sync(channel, timeout=60, what=f"coordinator at {cfg.infra.coordinator_addr}")
    coordinator = coordinator_pb2_grpc.CoordinatorStub(channel)
    metrics = MetricsLog(cfg.infra.run_dir)
    consumer = "trainer-0"

    if ckpt and state.policy_version > 0:
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
                "num_group_trainings": state.num_group_trainings,
            },
            tokenizer_dir=cfg.model.hf_checkpoint,
            par=par,
        )

    for step in range(state.step, cfg.rollout.num_rollout):
        t0 = time.perf_counter()
        batch = _collect(buffer, consumer, cfg.rollout.rollout_batch_size, state, cfg)
        if state.stop.is_set():
            log.info("stop requested; leaving %d read entries unacknowledged", len(batch))
            break
        t_data = time.perf_counter()
        trained_version = state.policy_version
        groups = [[sample_from_proto(p) for p in g.samples] for g, _ in batch.trained()]
        scores = _scores(groups, cfg)
        samples, report = apply_staleness_policy(
            [s for g in groups for s in g],
            trained_version,
            max_staleness=cfg.rollout.max_staleness,
            policy=cfg.algo.stale_sample_policy,
            mask_offpolicy=cfg.algo.mask_offpolicy_in_partial_rollout,
        )
        flat_scores = [x for g in scores for x in g]
        _share_step(par, samples, flat_scores, False, trained_version)
        stats = actor.train_rollout(samples, flat_scores, trained_version)
        t_compute = time.perf_counter()

        next_version = trained_version + int((step + 1) % cfg.train.update_weights_interval == 0)
        requeue = _requeue(batch, cfg, next_version)
        buffer.commit(
            [entry_id for entry_id, _ in batch.fresh],
            [r.entry_id for r in batch.reused] + batch.expired,
            requeue,
            reuse_maxlen=_reuse_capacity(cfg),
        )
        state.num_groups_consumed += len(batch.fresh)
        state.num_group_trainings += len(batch)
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
        status = coordinator.ReportProgress(
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
        state.wait_data_s += t_data - t0
        state.busy_s += t_end - t0
        mis_masked = stats.metrics.get("mis_masked_frac", 0.0) * stats.num_tokens
        response_tokens = max(report.num_response_tokens, 1)

        metrics.write(
            step=state.step,
            policy_version=state.policy_version,
            trained_version=trained_version,
            **group_metrics(samples, trained_version),
            staleness_hist=report.hist_json(),
            num_stale=report.num_stale,
            num_stale_dropped=report.num_dropped,
            logprob_abs_diff_mean=stats.logprob_abs_diff_mean,
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            pg_clipfrac=stats.pg_clipfrac,
            tis_mean=stats.tis_mean,
            **stats.metrics,
            offpolicy_masked_frac=report.num_offpolicy_masked_tokens / response_tokens,
            masked_frac=1.0 - (stats.num_tokens - mis_masked) / response_tokens,
            num_trained_tokens=stats.num_tokens,
            num_fresh_groups=len(batch.fresh),
            num_reused_groups=len(batch.reused),
            num_requeued_groups=len(requeue),
            num_reuse_expired=len(batch.expired),
            num_group_trainings=state.num_group_trainings,
            tokens_per_s=stats.num_tokens / max(t_end - t0, 1e-9),
            wait_data_s=t_data - t0,
            compute_s=t_compute - t_data,
            push_weights_s=push_s,
            trainer_idle_frac=(t_data - t0) / max(t_end - t0, 1e-9),
            trainer_idle_frac_run=state.wait_data_s / max(state.busy_s, 1e-9),
            num_optimizer_steps=stats.num_optimizer_steps,
            num_failed=sum(s.status is Status.FAILED for s in samples),
            **coordinator_counters(status),
        )
        for observe in state.observers:  # e.g. Prometheus (slipstream.telemetry)
            observe(metrics.rows[-1])

    _share_step(par, None, None, True, state.policy_version)  # followers: the run is over
    checkpoint(state.step)
    state.finished = state.step >= cfg.rollout.num_rollout
    status = _await_rollout_versions(coordinator, state.policy_version, cfg.infra.rpc_timeout)
    metrics.write_summary(
        finished=state.finished,
        policy_version=state.policy_version,
        num_groups_consumed=state.num_groups_consumed,
        num_group_trainings=state.num_group_trainings,
        trainer_idle_frac=state.wait_data_s / max(state.busy_s, 1e-9),
        rollout_server_versions=dict(status.server_versions),
        num_reward_failures=status.num_reward_failures,
    )
    buffer.close()
    channel.close()


def _follow(cfg: Config, state: TrainerState, actor: Actor) -> None:
    """A rank other than 0: train on what rank 0 shares, join every collective, talk to no one."""
    if cfg.train.load and state.policy_version > 0:
        actor.state_dict_for_sync()  # rank 0 re-pushes the resumed version: join its gather
    while True:
        samples, scores, stop, trained_version = _share_step(actor.par, None, None, False, 0)
        if stop:
            break
        actor.train_rollout(samples, scores, trained_version)
        state.step += 1
        if state.step % cfg.train.update_weights_interval == 0:
            state.policy_version += 1
            actor.state_dict_for_sync()  # the gather is a collective; rank 0 pushes
        if cfg.train.save_interval and state.step % cfg.train.save_interval == 0:
            save_checkpoint(cfg.save_dir, state.step, actor.model, actor.optimizer, {}, par=actor.par)
    save_checkpoint(cfg.save_dir, state.step, actor.model, actor.optimizer, {}, par=actor.par)
