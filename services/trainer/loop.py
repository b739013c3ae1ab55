"""The training loop, top to bottom: pull groups -> staleness -> advantages -> train -> push -> checkpoint -> commit.

    recover: re-read this consumer's pending entries; finish the commit the last checkpoint
             may not have made; what is left is trained first, in stream order
    for step in range(start, num_rollout):
        groups   = replayed pending groups, else fresh ones topped up with reused ones
                   (--max-reuse) when fresh are short; duplicates acknowledged and skipped
        samples  = apply_staleness_policy(...)      # --max-staleness, --stale-sample-policy,
                                                    # --mask-offpolicy-in-partial-rollout
        scores   = group_scores(rewards)            # per group, per --advantage-estimator
        stats    = actor.train_rollout(samples)     # old/ref log-probs, advantages, optimizer steps
        push weights every --update-weights-interval steps (a new policy version)
        report progress to the coordinator (admission control), write metrics.jsonl
        every --save-interval steps: checkpoint, trained.jsonl, then buffer.commit(...)

Exactly-once training across crashes. The checkpoint is the truth about what was trained;
Redis follows it. Entries trained since the last checkpoint stay pending for this consumer
and are committed (acked; reuse entries deleted and requeued, one MULTI/EXEC) right after the
next checkpoint is durably renamed. The checkpoint holds the training count of every group id
and the steps since the previous checkpoint, so a trainer killed anywhere resumes (`--load`)
without skipping or repeating a trajectory:

- killed before the checkpoint: the entries of the lost steps are still pending; the resumed
  trainer re-reads them (XREADGROUP from id 0) and trains them first, in stream order: the
  same batches in the same order, so in deterministic CPU mode the loss curve is the same;
- killed after the checkpoint, before the commit: the checkpoint's last steps' entries are
  still pending; the resumed trainer makes that commit (it knows them), trains nothing twice;
- killed after the commit: nothing pending; it goes on.

`--save-interval 0` keeps meaning "checkpoint only at the end", and so the whole run commits
at the end: a trainer that dies without any checkpoint has trained nothing that counts, and a
new one (same consumer name) trains the same entries from the start. Between commits the
entries sit in the pending list: memory Redis cannot trim yet, and with --max-reuse > 1 the
requeued groups only become readable at the commit. Long runs want --save-interval.

The consumer name is fixed ("trainer-0", one trainer per run), so a restarted trainer finds its
own pending entries. Entries pending on any other consumer name for longer than
--lease-timeout are claimed (XAUTOCLAIM) at start: a trainer that was renamed, or whose
predecessor used another name, takes over what that one left.

Versions. Weights are pushed before the step's checkpoint (a rollout server should not wait
for disk), so a trainer can die after pushing version v and resume from a checkpoint of v-1.
Versions stay strictly increasing: when the coordinator's version is ahead of the
checkpoint's, the resumed trainer pushes its weights as coordinator version + 1. When the
coordinator restarted and holds no weights (`weights_held` false), the trainer pushes the last
version again (same bytes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slipstream.algorithms.advantages import group_scores
from slipstream.algorithms.staleness import StalenessBound, apply_staleness_policy
from slipstream.buffer.replay import ReplayBuffer, ReusedGroup
from slipstream.config import Config
from slipstream.faults import crash_point
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from slipstream.rpc.channel import sync_channel, wait_healthy_sync
from slipstream.rpc.convert import sample_from_proto, sample_to_proto
from slipstream.types import Sample, Status

from .actor import Actor
from .batch import trainable
from .checkpoint import load_trainer_state, resolve_checkpoint, save_checkpoint
from .ledger import Consumption, StepRecord, TrainedLedger
from .metrics import MetricsLog, coordinator_counters, group_metrics
from .parallel import Parallel, broadcast_bytes
from .reconnect import Reconnect
from .weight_push import WeightPusher

log = logging.getLogger("slipstream.trainer")
CONSUMER = "trainer-0"
REDIS = "Redis (replay buffer)"


class NonFiniteStop(RuntimeError):
    """--max-nonfinite-steps optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainerState:
    step: int = 0
    policy_version: int = 0
    num_groups_consumed: int = 0  # fresh groups trained (each once)
    num_group_trainings: int = 0  # groups trained, reuses included
    num_skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient, over the run
    nonfinite_in_a_row: int = 0  # consecutive ones (a rollout step with a good optimizer step resets it)
    wait_data_s: float = 0.0  # time spent waiting for data, over the run
    busy_s: float = 0.0  # wall time of steps, over the run
    finished: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    observers: list[Callable[[dict], None]] = field(default_factory=list)  # get each step's metrics row


@dataclass
class StepGroups:
    """The groups of one step: fresh (stream ids to ack) and reused (to delete), plus expired reuses."""

    fresh: list[tuple[str, types_pb2.Group]] = field(default_factory=list)
    reused: list[ReusedGroup] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)  # reuse entries too stale to train: deleted
    duplicate_fresh: list[str] = field(default_factory=list)  # already trained: acked, skipped
    duplicate_reused: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.fresh) + len(self.reused)

    def trained(self) -> list[tuple[types_pb2.Group, int]]:
        """(group, times trained before this step), fresh first."""
        return [(g, 0) for _, g in self.fresh] + [(r.group, r.times_trained) for r in self.reused]


@dataclass
class Feed:
    """Where a step's groups come from: replayed pending entries first, then the buffer."""

    consumption: Consumption
    reconnect: Reconnect
    replay_fresh: deque[tuple[str, types_pb2.Group]] = field(default_factory=deque)
    replay_reuse: deque[ReusedGroup] = field(default_factory=deque)
    redis_recoveries: int = 0  # Redis comebacks already resynced

    @staticmethod
    def default(cfg: Config) -> Feed:
        return Feed(Consumption(max_reuse=cfg.train.max_reuse), Reconnect(cfg.infra.reconnect_timeout))

    def read_pending(
        self, buffer: ReplayBuffer, consumer: str
    ) -> tuple[list[tuple[str, types_pb2.Group]], list[ReusedGroup]]:
        """Every entry pending on `consumer`: (groups-stream entries, reuse-stream entries)."""
        fresh = self.reconnect.call(REDIS, lambda: buffer.read_pending_groups(consumer))
        reused = self.reconnect.call(REDIS, lambda: buffer.read_pending_reuse(consumer))
        return fresh, reused

    def replay(
        self, fresh: list[tuple[str, types_pb2.Group]], reused: list[ReusedGroup], skip: set[str]
    ) -> int:
        """Queue pending entries (all but `skip`) to be trained before anything new; returns how many.
        `_collect` acknowledges the duplicates among them."""
        fresh = [(i, g) for i, g in fresh if i not in skip]
        reused = [r for r in reused if r.entry_id not in skip]
        self.replay_fresh.extend(fresh)
        self.replay_reuse.extend(reused)
        return len(fresh) + len(reused)


def _collect(
    buffer: ReplayBuffer,
    consumer: str,
    count: int,
    state: TrainerState,
    cfg: Config,
    feed: Feed | None = None,
) -> StepGroups:
    """`count` groups: replayed ones first, then fresh; reused ones (oldest first) only to fill
    what fresh cannot now. Groups already trained as often as allowed are acknowledged and skipped."""
    feed = feed or Feed.default(cfg)
    batch = StepGroups()
    planned: dict[str, int] = {}  # trainings this batch adds, so a batch never holds a group twice
    reuse = cfg.train.max_reuse > 1
    redis = REDIS
    if feed.reconnect.recoveries.get(REDIS, 0) != feed.redis_recoveries:
        _resync(buffer, consumer, feed)

    def take_fresh(entries) -> None:
        for entry_id, g in entries:
            if feed.consumption.is_duplicate(g.group_id, 1, planned):
                batch.duplicate_fresh.append(entry_id)
            else:
                planned[g.group_id] = planned.get(g.group_id, 0) + 1
                batch.fresh.append((entry_id, g))

    def take_reused(entries) -> None:
        for r in entries:
            if feed.consumption.is_duplicate(r.group.group_id, r.times_trained + 1, planned):
                batch.duplicate_reused.append(r.entry_id)
            elif not StalenessBound.from_config(cfg).within(r.group.samples, state.policy_version):
                batch.expired.append(r.entry_id)
            else:
                planned[r.group.group_id] = planned.get(r.group.group_id, 0) + 1
                batch.reused.append(r)

    def pop(queue: deque, n: int) -> list:
        return [queue.popleft() for _ in range(min(n, len(queue)))]

    while len(batch) < count and not state.stop.is_set():
        if feed.replay_fresh or feed.replay_reuse:  # what a dead predecessor read: as it read it
            take_fresh(pop(feed.replay_fresh, count - len(batch)))
            take_reused(pop(feed.replay_reuse, count - len(batch)))
            continue
        take_fresh(feed.reconnect.call(redis, lambda: buffer.read_groups(consumer, count - len(batch), 0)))
        if reuse and len(batch) < count:
            take_reused(feed.reconnect.call(redis, lambda: buffer.read_reuse(consumer, count - len(batch))))
        if len(batch) < count:
            take_fresh(
                feed.reconnect.call(redis, lambda: buffer.read_groups(consumer, count - len(batch), 500))
            )
    duplicates = len(batch.duplicate_fresh) + len(batch.duplicate_reused)
    if duplicates:
        log.warning("%d groups already trained as often as allowed: acknowledged and skipped", duplicates)
        feed.reconnect.call(redis, lambda: buffer.commit(batch.duplicate_fresh, batch.duplicate_reused))
        feed.consumption.num_duplicates_skipped += duplicates
    return batch


def _resync(buffer: ReplayBuffer, consumer: str, feed: Feed) -> None:
    """After Redis came back: look at this consumer's pending list again.

    A restarted Redis (AOF, everysec) may have lost the last second of acknowledgements, and a
    read whose reply the connection drop swallowed left entries pending that this trainer never
    saw. Entries of steps not yet committed are expected there; of the rest, groups trained as
    often as allowed are acknowledged (duplicates), the others are trained like replayed ones.
    """
    feed.redis_recoveries = feed.reconnect.recoveries.get(REDIS, 0)
    known = {i for r in feed.consumption.uncommitted for i in r.entry_ids}
    known |= {i for i, _ in feed.replay_fresh} | {r.entry_id for r in feed.replay_reuse}
    if queued := feed.replay(*feed.read_pending(buffer, consumer), skip=known):
        log.info("Redis came back: %d entries pending that this trainer had not trained or committed", queued)


def _requeue(batch: StepGroups, cfg: Config, next_version: int) -> list[tuple[types_pb2.Group, int]]:
    """Groups to train again: fewer than --max-reuse trainings, within --max-staleness of the next version."""
    return [
        (g, times + 1)
        for g, times in batch.trained()
        if times + 1 < cfg.train.max_reuse and StalenessBound.from_config(cfg).within(g.samples, next_version)
    ]


def _commit(
    buffer: ReplayBuffer,
    records: list[StepRecord],
    groups: dict[str, types_pb2.Group],
    cfg: Config,
    reconnect: Reconnect,
) -> None:
    """Tell Redis what a checkpoint trained: one MULTI/EXEC for all its steps."""
    if not records:
        return
    fresh = [i for r in records for i in r.fresh_ids]
    reused = [i for r in records for i in r.reused_ids]
    requeue = [(groups[gid], times) for r in records for gid, times in r.requeue]
    reconnect.call(
        REDIS,
        lambda: buffer.commit(
            fresh, reused, requeue, reuse_maxlen=StalenessBound.from_config(cfg).reuse_capacity()
        ),
    )
    # Acknowledged entries are dead weight: drop everything behind the oldest entry the consumer
    # group still needs (pending or never delivered), so a long run's stream stays bounded and a
    # full Redis (maxmemory, noeviction) gets its room back.
    trimmed = reconnect.call(REDIS, buffer.trim_acknowledged)
    log.debug("trimmed %d acknowledged entries from the groups stream", trimmed)


def _recover(
    buffer: ReplayBuffer,
    feed: Feed,
    last_steps: list[StepRecord],
    ledger: TrainedLedger,
    cfg: Config,
) -> None:
    """Before the first step: take over what a dead predecessor left pending, and finish its commit."""
    rc = feed.reconnect
    claimed = rc.call(
        REDIS, lambda: buffer.claim_stale(CONSUMER, min_idle_ms=int(cfg.infra.lease_timeout * 1000))
    )
    if claimed:
        log.info("claimed %d entries another consumer left pending", len(claimed))
    fresh, reused = feed.read_pending(buffer, CONSUMER)
    pending = {i for i, _ in fresh} | {r.entry_id for r in reused}
    ledger.append(last_steps)  # again: the crash may have come before they were written
    last_ids = {i for r in last_steps for i in r.entry_ids}
    if last_ids & pending:  # the commit is one MULTI/EXEC: all of it happened, or none
        groups = {g.group_id: g for _, g in fresh} | {r.group.group_id: r.group for r in reused}
        _commit(buffer, last_steps, groups, cfg, rc)
        log.info("committed the %d steps of the checkpoint its predecessor did not", len(last_steps))
    if queued := feed.replay(fresh, reused, skip=last_ids):
        log.info("%d pending entries from before the restart: trained first, in stream order", queued)


def _scores(groups: list[list[Sample]], cfg: Config) -> list[list[float]]:
    rewards = torch.tensor([[s.get_reward_value() if trainable(s) else 0.0 for s in g] for g in groups])
    a = cfg.algo
    return group_scores(
        rewards, a.advantage_estimator, normalize_std=not a.disable_grpo_std_normalization
    ).tolist()


def _await_rollout_versions(pusher: WeightPusher, version: int) -> coordinator_pb2.CoordinatorStatus:
    """At the end of a run, give rollout servers a moment to apply the last version (for the record)."""
    deadline = time.monotonic() + 60.0
    while True:
        status = pusher.status()
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


def _share_flag(par: Parallel, value: bool | None) -> bool:
    """Rank 0's yes/no on every rank (e.g. "I push now": the weight gather is a collective)."""
    if not par.enabled:
        return bool(value)
    return bool(par.broadcast_floats([float(bool(value))] if par.is_main else None)[0])


def _startup_push(pusher: WeightPusher, state: TrainerState) -> int | None:
    """The version to push before the first step, if any (see the module docstring, Versions)."""
    status = pusher.status()
    if status.policy_version > state.policy_version:
        log.info(
            "coordinator is at v%d, ahead of this checkpoint's v%d: pushing these weights as v%d",
            status.policy_version,
            state.policy_version,
            status.policy_version + 1,
        )
        return status.policy_version + 1
    if state.policy_version > 0 and (status.policy_version < state.policy_version or not status.weights_held):
        return state.policy_version
    return None


def train(cfg: Config, state: TrainerState) -> None:
    torch.manual_seed(cfg.train.seed)
    ckpt = resolve_checkpoint(cfg.train.load) if cfg.train.load else None
    actor = Actor(cfg, model_path=str(ckpt) if ckpt else None)
    par = actor.par
    consumption, last_steps = Consumption(max_reuse=cfg.train.max_reuse), []
    if ckpt:
        saved = load_trainer_state(ckpt, actor.model, actor.optimizer)
        state.step, state.policy_version = saved["step"], saved["policy_version"]
        state.num_groups_consumed = saved.get("num_groups_consumed", 0)
        state.num_group_trainings = saved.get("num_group_trainings", state.num_groups_consumed)
        state.num_skipped_steps = saved.get("num_skipped_steps", 0)
        state.nonfinite_in_a_row = saved.get("nonfinite_in_a_row", 0)
        consumption, last_steps = Consumption.from_json(saved, cfg.train.max_reuse)
        log.info("resumed from %s at step %d (policy v%d)", ckpt, state.step, state.policy_version)
    if not par.is_main:
        return _follow(cfg, state, actor)
    reconnect = Reconnect(cfg.infra.reconnect_timeout)
    buffer = ReplayBuffer(cfg.infra.redis_connect_url, cfg.infra.effective_run_id)
    channel = sync_channel(cfg.infra.coordinator_addr)
    wait_healthy_sync(
        channel,
        timeout=max(60.0, cfg.infra.reconnect_timeout),
        what=f"coordinator at {cfg.infra.coordinator_addr}",
    )
    coordinator = coordinator_pb2_grpc.CoordinatorStub(channel)
    pusher = WeightPusher(
        coordinator, cfg.train.weight_sync_dtype, cfg.infra.rpc_timeout, reconnect,
        colocate=cfg.cluster.colocate and actor.device.type == "cuda",
    )  # fmt: skip
    metrics = MetricsLog(cfg.infra.run_dir)
    ledger = TrainedLedger(cfg.infra.run_dir)
    feed = Feed(consumption, reconnect)
    _recover(buffer, feed, last_steps, ledger, cfg)

    version = _startup_push(pusher, state)
    # A resumed trainer keeps its version's bytes even when the coordinator has them: should the
    # coordinator restart later, they are what it must get again. (The gather is a collective.)
    if _share_flag(par, version is not None or state.policy_version > 0):
        if version is not None:
            state.policy_version = version
        pusher.push(actor.state_dict_for_sync(), state.policy_version, send=version is not None)

    last_saved = state.step if ckpt else -1

    def checkpoint_and_commit(step: int) -> None:
        nonlocal last_saved
        save_checkpoint(
            cfg.save_dir,
            step,
            actor.model,
            actor.optimizer,
            {
                "policy_version": state.policy_version,
                "num_groups_consumed": state.num_groups_consumed,
                "num_group_trainings": state.num_group_trainings,
                "num_skipped_steps": state.num_skipped_steps,
                "nonfinite_in_a_row": state.nonfinite_in_a_row,
                "consumer": CONSUMER,
                **consumption.to_json(),
            },
            tokenizer_dir=cfg.model.hf_checkpoint,
            par=par,
        )
        records, groups = consumption.take_uncommitted()
        ledger.append(records)
        crash_point("after_checkpoint", step)
        _commit(buffer, records, groups, cfg, reconnect)
        crash_point("after_commit", step)
        last_saved = step

    def report(step: int) -> coordinator_pb2.CoordinatorStatus:
        status = reconnect.call(
            f"coordinator at {cfg.infra.coordinator_addr} (ReportProgress)",
            lambda: coordinator.ReportProgress(
                coordinator_pb2.TrainerProgress(
                    step=step,
                    num_groups_consumed=state.num_groups_consumed,
                    finished=step >= cfg.rollout.num_rollout,
                ),
                timeout=cfg.infra.rpc_timeout,
            ),
        )
        pusher.confirm(status)
        if not status.weights_held and pusher.version and status.policy_version <= pusher.version:
            pusher.push_again()  # the coordinator restarted and kept only the version number
        if status.policy_version > state.policy_version:  # another pusher, or a lost future
            log.warning(
                "coordinator is at v%d, ahead of v%d: adopting it",
                status.policy_version,
                state.policy_version,
            )
            state.policy_version = status.policy_version
        return status

    stopped_nonfinite = False
    for step in range(state.step, cfg.rollout.num_rollout):
        t0 = time.perf_counter()
        batch = _collect(buffer, CONSUMER, cfg.rollout.rollout_batch_size, state, cfg, feed)
        if state.stop.is_set():
            log.info("stop requested; leaving %d read entries unacknowledged", len(batch))
            break
        crash_point("after_read", step + 1)
        t_data = time.perf_counter()
        trained_version = state.policy_version
        groups = [[sample_from_proto(p) for p in g.samples] for g, _ in batch.trained()]
        scores = _scores(groups, cfg)
        samples, report_ = apply_staleness_policy(
            [s for g in groups for s in g],
            trained_version,
            max_staleness=StalenessBound.from_config(cfg).max_staleness,
            policy=cfg.algo.stale_sample_policy,
            mask_offpolicy=cfg.algo.mask_offpolicy_in_partial_rollout,
        )
        flat_scores = [x for g in scores for x in g]
        _share_step(par, samples, flat_scores, False, trained_version)
        stats = actor.train_rollout(samples, flat_scores, trained_version)
        t_compute = time.perf_counter()
        crash_point("after_train", step + 1)

        # A rollout step whose every optimizer step was skipped left the weights as they were.
        state.num_skipped_steps += stats.num_skipped_steps
        if stats.num_optimizer_steps == 0 and stats.num_skipped_steps > 0:
            state.nonfinite_in_a_row += stats.num_skipped_steps
        elif stats.num_optimizer_steps > 0:
            state.nonfinite_in_a_row = 0

        push_due = (step + 1) % cfg.train.update_weights_interval == 0
        next_version = trained_version + int(push_due)
        requeue = _requeue(batch, cfg, next_version)
        trained = batch.trained()
        consumption.record(
            StepRecord(
                step=step + 1,
                group_ids=[g.group_id for g, _ in trained],
                times_trained=[times + 1 for _, times in trained],
                fresh_ids=[entry_id for entry_id, _ in batch.fresh],
                reused_ids=[r.entry_id for r in batch.reused] + batch.expired,
                requeue=[(g.group_id, times) for g, times in requeue],
            ),
            [g for g, _ in requeue],
        )
        state.num_groups_consumed += len(batch.fresh)
        state.num_group_trainings += len(batch)
        push_s = 0.0
        if push_due:
            state.policy_version = max(state.policy_version, trained_version) + 1
            push_s, _ = pusher.push(actor.state_dict_for_sync(), state.policy_version)
        state.step = step + 1
        status = report(state.step)
        t_end = time.perf_counter()
        state.wait_data_s += t_data - t0
        state.busy_s += t_end - t0
        mis_masked = stats.metrics.get("mis_masked_frac", 0.0) * stats.num_tokens
        response_tokens = max(report_.num_response_tokens, 1)

        metrics.write(
            step=state.step,
            policy_version=state.policy_version,
            trained_version=trained_version,
            **group_metrics(samples, trained_version),
            staleness_hist=report_.hist_json(),
            num_stale=report_.num_stale,
            num_stale_dropped=report_.num_dropped,
            logprob_abs_diff_mean=stats.logprob_abs_diff_mean,
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            pg_clipfrac=stats.pg_clipfrac,
            tis_mean=stats.tis_mean,
            **stats.metrics,
            offpolicy_masked_frac=report_.num_offpolicy_masked_tokens / response_tokens,
            masked_frac=1.0 - (stats.num_tokens - mis_masked) / response_tokens,
            num_trained_tokens=stats.num_tokens,
            num_fresh_groups=len(batch.fresh),
            num_reused_groups=len(batch.reused),
            num_requeued_groups=len(requeue),
            num_reuse_expired=len(batch.expired),
            num_group_trainings=state.num_group_trainings,
            num_duplicates_skipped=consumption.num_duplicates_skipped,
            tokens_per_s=stats.num_tokens / max(t_end - t0, 1e-9),
            wait_data_s=t_data - t0,
            compute_s=t_compute - t_data,
            push_weights_s=push_s,
            trainer_idle_frac=(t_data - t0) / max(t_end - t0, 1e-9),
            trainer_idle_frac_run=state.wait_data_s / max(state.busy_s, 1e-9),
            num_optimizer_steps=stats.num_optimizer_steps,
            num_skipped_steps=stats.num_skipped_steps,
            num_nonfinite_in_a_row=state.nonfinite_in_a_row,
            num_failed=sum(s.status is Status.FAILED for s in samples),
            **coordinator_counters(status),
        )
        for observe in state.observers:  # e.g. Prometheus (slipstream.telemetry)
            observe(metrics.rows[-1])
        if cfg.train.save_interval and state.step % cfg.train.save_interval == 0:
            checkpoint_and_commit(state.step)
        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            stopped_nonfinite = True
            break

    _share_step(par, None, None, True, state.policy_version)  # followers: the run is over
    if last_saved != state.step:
        checkpoint_and_commit(state.step)
    if stopped_nonfinite:
        buffer.close()
        channel.close()
        raise NonFiniteStop(
            f"{state.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
            f"(--max-nonfinite-steps {cfg.train.max_nonfinite_steps}); stopped at step {state.step}, "
            f"last good state saved in {cfg.save_dir / f'step_{state.step:06d}'}"
        )
    state.finished = state.step >= cfg.rollout.num_rollout
    status = _await_rollout_versions(pusher, state.policy_version)
    metrics.write_summary(
        finished=state.finished,
        policy_version=state.policy_version,
        num_groups_consumed=state.num_groups_consumed,
        num_group_trainings=state.num_group_trainings,
        num_duplicates_skipped=consumption.num_duplicates_skipped,
        num_skipped_steps=state.num_skipped_steps,
        trainer_idle_frac=state.wait_data_s / max(state.busy_s, 1e-9),
        rollout_server_versions=dict(status.server_versions),
        num_reward_failures=status.num_reward_failures,
    )
    buffer.close()
    channel.close()


def _follow(cfg: Config, state: TrainerState, actor: Actor) -> None:
    """A rank other than 0: train on what rank 0 shares, join every collective, talk to no one."""
    par = actor.par
    if _share_flag(par, None):
        actor.state_dict_for_sync()  # rank 0 pushes before its first step: join its gather
    last_saved = state.step if cfg.train.load else -1
    while True:
        samples, scores, stop, trained_version = _share_step(par, None, None, False, 0)
        if stop:
            break
        actor.train_rollout(samples, scores, trained_version)
        state.step += 1
        if state.step % cfg.train.update_weights_interval == 0:
            actor.state_dict_for_sync()  # the gather is a collective; rank 0 pushes
        if cfg.train.save_interval and state.step % cfg.train.save_interval == 0:
            save_checkpoint(cfg.save_dir, state.step, actor.model, actor.optimizer, {}, par=par)
            last_saved = state.step
    if last_saved != state.step:
        save_checkpoint(cfg.save_dir, state.step, actor.model, actor.optimizer, {}, par=par)
