"""The training loop, top to bottom: pull groups -> staleness -> advantages -> train -> push -> checkpoint.

    start:  resume from --load; finish the last checkpoint's commit and queue what a dead
            predecessor left pending (Checkpointer.recover); push what the coordinator needs
            (Versions.start)
    for step in start + 1 .. num_rollout:
        batch    = feed.collect(rollout_batch_size)    # replayed pending groups first, then fresh,
                                                       # topped up with reused ones (--max-reuse)
        samples  = apply_staleness_policy(...)         # --max-staleness, --stale-sample-policy,
                                                       # --mask-offpolicy-in-partial-rollout
        scores   = group_scores(rewards)               # per group, per --advantage-estimator
        stats    = actor.train_rollout(samples)        # old/ref log-probs, advantages, optimizer steps
        versions.after_step(step)                      # a new version every --update-weights-interval
        report progress to the coordinator (admission control; its reply read a step later),
        write metrics.jsonl
        checkpointer.maybe_save(step)                  # every --save-interval: checkpoint,
                                                       # trained.jsonl, then the Redis commit
    checkpointer.maybe_save(step, last=True)

Each rule has one home: exactly-once consumption across crashes in `feed.py`; when to save and
what a save makes durable in `checkpointer.py`; policy versions across trainer and coordinator
restarts in `versions.py`; what other torchrun ranks do (what rank 0 tells them) in `ranks.py`;
the arithmetic of a step in `steps.py` (on the model `actor.py` holds); the metrics row in `metrics.py`.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
import torch

from slipstream.algorithms.advantages import group_scores
from slipstream.algorithms.staleness import StalenessBound, StalenessReport, apply_staleness_policy
from slipstream.buffer.coordinator_store import CoordinatorStore, RunFinished
from slipstream.buffer.replay import ReplayBuffer
from slipstream.config import AlgoConfig, Config
from slipstream.faults import crash_point
from slipstream.log import mark_up
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc
from slipstream.rpc.channel import sync_channel, wait_healthy_sync
from slipstream.rpc.convert import sample_from_proto
from slipstream.types import Sample

from .actor import Actor
from .checkpoint import load_trainer_state, resolve_checkpoint
from .checkpointer import Checkpointer
from .feed import CONSUMER, Feed, StepGroups
from .ledger import Consumption, StepRecord, TrainedLedger
from .logging_sinks import open_sinks
from .metrics import MetricsLog, StepTimes, step_row
from .nothing_trained import warn_if_nothing_trained
from .progress import ProgressReports
from .ranks import SharedStep, follow, share_step, weight_gather
from .reconnect import Reconnect, Unreachable
from .rollout_bound import RolloutBoundHint
from .state import NonFiniteStop, TrainerState
from .versions import Versions
from .weight_push import WeightPusher

log = logging.getLogger("slipstream.trainer")


def train(cfg: Config, state: TrainerState) -> None:
    """The trainer's run, on every rank (rank 0 drives; the others follow it)."""
    torch.manual_seed(cfg.train.seed)
    if not cfg.train.load:
        refuse_a_finished_run(cfg)  # before the model loads
    ckpt = resolve_checkpoint(cfg.train.load) if cfg.train.load else None
    actor = Actor.from_config(cfg, model_path=str(ckpt) if ckpt else None)
    consumption, last_steps = Consumption(max_reuse=cfg.train.max_reuse), []
    if ckpt:
        saved = load_trainer_state(ckpt, actor.model, actor.optimizer, actor.scheduler, actor.draft_parts)
        state.restore(saved)
        consumption, last_steps = Consumption.from_json(saved, cfg.train.max_reuse)
        log.info("resumed from %s at step %d (policy v%d)", ckpt, state.step, state.policy_version)
    saved_at = state.step if ckpt else -1
    if not actor.par.is_main:
        checkpointer = Checkpointer(
            cfg.save_dir, cfg.train.save_interval, actor.model, actor.optimizer, actor.par,
            saved_at=saved_at, draft=actor.draft_parts,
        )  # fmt: skip
        return follow(actor, checkpointer, state.step)
    trainer = Trainer(cfg, state, actor, consumption, saved_at)
    mark_up()  # model loaded, checkpoint resumed, coordinator reached: errors from here exit 1
    trainer.run(last_steps)


def refuse_a_finished_run(cfg: Config) -> None:
    """`RunFinished` when Redis says this run id's run is over: started again without --load, the
    trainer would train from the base model again and its checkpoints would shadow the run's."""
    store = CoordinatorStore(cfg.infra.redis_connect_url, cfg.infra.effective_run_id)
    try:
        step = store.finished_step()
    except redis.exceptions.RedisError:
        return  # unreachable now: the feed's reconnect rules decide, as for any start
    finally:
        store.close()
    if step is not None:
        raise RunFinished(cfg.infra.effective_run_id, step)


def wait_for_coordinator(channel, cfg: Config, stop: threading.Event) -> None:
    """The coordinator healthy (it may still be starting: the launcher starts every service at
    once); TimeoutError after max(60 s, --reconnect-timeout), or at once when a stop is asked for."""
    addr = cfg.infra.coordinator_addr
    deadline = time.monotonic() + max(60.0, cfg.infra.reconnect_timeout)
    while True:
        try:
            return wait_healthy_sync(channel, timeout=1.0, what=f"coordinator at {addr}")
        except TimeoutError:
            if stop.is_set() or time.monotonic() > deadline:
                raise


class Trainer:
    """Rank 0: the components the loop drives, wired once, and the loop."""

    def __init__(
        self, cfg: Config, state: TrainerState, actor: Actor, consumption: Consumption, saved_at: int
    ):
        infra = cfg.infra
        self.cfg, self.state, self.actor = cfg, state, actor
        self.bound = StalenessBound.from_config(cfg)
        self.reconnect = Reconnect(infra.reconnect_timeout, state.stop)  # short once stopping
        self.buffer = ReplayBuffer(infra.redis_connect_url, infra.effective_run_id)
        self.channel = sync_channel(infra.coordinator_addr)
        wait_for_coordinator(self.channel, cfg, state.stop)
        self.coordinator = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.progress = ProgressReports(
            self.coordinator, infra.coordinator_addr, infra.rpc_timeout, self.reconnect
        )
        pusher = WeightPusher(
            self.coordinator, cfg.train.effective_weight_sync_dtype(actor.device.type, cfg.cluster.colocate),
            infra.rpc_timeout, self.reconnect,
            colocate=cfg.cluster.colocate and actor.device.type == "cuda",
            int4_targets=cfg.train.int4_qat_targets, weight_transport=cfg.train.weight_transport,
            host=infra.host,
        )  # fmt: skip
        self.versions = Versions(pusher, cfg.train.update_weights_interval)
        self.gather = weight_gather(actor)
        self.metrics = MetricsLog(infra.run_dir)
        self.sinks = open_sinks(cfg)  # TensorBoard, W&B: the same rows
        state.observers.append(self.sinks.log)
        state.observers.append(RolloutBoundHint(self.bound.max_staleness))  # on the console
        self.feed = Feed(self.buffer, consumption, self.reconnect, self.bound)
        self.checkpointer = Checkpointer(
            cfg.save_dir, cfg.train.save_interval, actor.model, actor.optimizer, actor.par,
            saved_at=saved_at, tokenizer_dir=cfg.model.hf_checkpoint,
            describe=lambda: {**state.checkpoint_meta(), "consumer": CONSUMER, **consumption.to_json()},
            feed=self.feed, ledger=TrainedLedger(infra.run_dir), scheduler=actor.scheduler,
            draft=actor.draft_parts,
        )  # fmt: skip

    def run(self, last_steps: list[StepRecord]) -> None:
        s, limit = self.state, self.cfg.train.max_nonfinite_steps
        try:
            self.checkpointer.recover(last_steps, self.cfg.infra.lease_timeout)
            s.policy_version = self.versions.start(s.policy_version, self.gather)
            if self.actor.device.type == "cuda" and not self.actor.par.enabled:
                self.actor.warm_up()  # while the rollout servers make the first samples
            nonfinite = False
            for step in range(s.step + 1, self.cfg.rollout.num_rollout + 1):
                if not self.train_step(step):
                    break
                if nonfinite := s.nonfinite_in_a_row >= limit:
                    break
            share_step(self.actor.par, None)  # followers: the run is over
            self.checkpointer.maybe_save(s.step, last=True)
            if nonfinite:
                raise NonFiniteStop(
                    f"{s.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                    f"(--max-nonfinite-steps {limit}); stopped at step {s.step}, "
                    f"last good state saved in {self.cfg.save_dir / f'step_{s.step:06d}'}"
                )
            self.summarize()
        finally:
            self.progress.close()
            self.versions.pusher.close()  # its /dev/shm files (servers that mapped one keep it)
            self.buffer.close()
            self.channel.close()
            self.sinks.close()

    def train_step(self, step: int) -> bool:
        """Train step `step` (1-based); False when a stop was asked for before it had its groups."""
        s, t0 = self.state, time.perf_counter()
        batch = self.feed.collect(self.cfg.rollout.rollout_batch_size, s.policy_version, s.stop)
        if s.stop.is_set():
            log.info("stop requested; leaving %d read entries unacknowledged", len(batch))
            return False
        crash_point("after_read", step)
        t_data, trained_version = time.perf_counter(), s.policy_version
        samples, scores, staleness = self.prepare(batch, trained_version)
        share_step(self.actor.par, SharedStep(step, samples, scores, trained_version))
        stats = self.actor.train_rollout(samples, scores, trained_version)
        t_compute = time.perf_counter()
        warn_if_nothing_trained(step, samples, staleness, stats.num_tokens)  # on the console
        crash_point("after_train", step)

        s.count_optimizer_steps(stats.num_optimizer_steps, stats.num_skipped_steps)
        requeue = self.feed.record(step, batch, trained_version + self.versions.push_due(step))
        s.num_groups_consumed += len(batch.fresh)
        s.num_group_trainings += len(batch)
        s.policy_version, push_s = self.versions.after_step(step, s.policy_version, self.gather)
        s.step = step
        status = self.report(step)
        t_end = time.perf_counter()
        s.wait_data_s += t_data - t0
        s.busy_s += t_end - t0

        row = step_row(
            s, trained_version=trained_version, samples=samples, staleness=staleness, stats=stats,
            batch=batch, num_requeued=len(requeue),
            num_duplicates_skipped=self.feed.consumption.num_duplicates_skipped,
            times=StepTimes(t_data - t0, t_compute - t_data, push_s, t_end - t0), status=status,
        )  # fmt: skip
        self.metrics.write(**row)
        for observe in s.observers:  # e.g. Prometheus (slipstream.telemetry)
            observe(self.metrics.rows[-1])
        self.checkpointer.maybe_save(step)
        return True

    def prepare(
        self, batch: StepGroups, trained_version: int
    ) -> tuple[list[Sample], list[float], StalenessReport]:
        """The step's samples (loss masks narrowed by the staleness policy) and their scores."""
        groups = [[sample_from_proto(p) for p in g.samples] for g, _ in batch.trained()]
        scores = _scores(groups, self.cfg.algo)
        a = self.cfg.algo
        samples, staleness = apply_staleness_policy(
            [x for g in groups for x in g],
            trained_version,
            max_staleness=self.bound.max_staleness,
            policy=a.stale_sample_policy,
            mask_offpolicy=a.mask_offpolicy_in_partial_rollout,
        )
        return samples, [x for g in scores for x in g], staleness

    def report(self, step: int) -> coordinator_pb2.CoordinatorStatus:
        """ReportProgress for `step` (the coordinator's admission control follows it), then the
        version rules of the reply in hand: the previous step's (`progress.py` says why)."""
        progress = coordinator_pb2.TrainerProgress(
            step=step,
            num_groups_consumed=self.state.num_groups_consumed,
            finished=step >= self.cfg.rollout.num_rollout,
        )
        status = self.progress.send(progress)
        self.state.policy_version = self.versions.after_report(status, self.state.policy_version)
        return status

    def summarize(self) -> None:
        s = self.state
        s.finished = s.step >= self.cfg.rollout.num_rollout
        try:  # stopping: one look (rollout servers stop first), never a wait on a coordinator gone
            status = self.versions.await_servers(s.policy_version, 0.0 if s.stop.is_set() else 60.0)
        except Unreachable as e:
            if not s.stop.is_set():
                raise
            log.warning("summary without the coordinator's figures: %s", e)
            status = coordinator_pb2.CoordinatorStatus()
        self.metrics.write_summary(
            finished=s.finished,
            policy_version=s.policy_version,
            num_groups_consumed=s.num_groups_consumed,
            num_group_trainings=s.num_group_trainings,
            num_duplicates_skipped=self.feed.consumption.num_duplicates_skipped,
            num_skipped_steps=s.num_skipped_steps,
            trainer_idle_frac=s.idle_frac,
            rollout_server_versions=dict(status.server_versions),
            num_reward_failures=status.num_reward_failures,
        )


def _scores(groups: list[list[Sample]], a: AlgoConfig) -> list[list[float]]:
    rewards = torch.tensor([[s.get_reward_value() if s.is_trainable else 0.0 for s in g] for g in groups])
    return group_scores(
        rewards, a.advantage_estimator, normalize_std=not a.disable_grpo_std_normalization
    ).tolist()
