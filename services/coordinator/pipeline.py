"""The pipeline: the life of a group, from admission to its place in the buffer. No gRPC here.

A group is one prompt x `n_samples_per_prompt` samples, and it is always in exactly one `Stage`
(groups.py); `_move` is the only way out of one, and refuses any arrow not drawn here:

    GENERATING --last sample in--> SCORING --kept--> READY --position--> STORING --> STORED
                                      \\--filter drops--> FILTERED              \\--> LOST, IN_DOUBT

- GENERATING: admitted while the staleness bound allows (`may_dispatch`) and the reward is up
  (`reward_up`: an unavailable reward pauses admission, scoring.py), under the version then
  served and with the deadline that version gives it (admission.py). Its samples are queued,
  leased to a stream, or parked as partials: the `Ledger` keeps that, sample by sample. A sample
  that comes back ABORTED is parked: written to the buffer's partial stream and, before any new
  prompt is admitted, taken back and queued first, to be continued under the newest weights
  (partials.py).
- SCORING: every sample is in; one reward call, with retries; a sample whose reward keeps failing
  is FAILED and dead-lettered. The dynamic filter then keeps the group (READY) or drops it
  (FILTERED: another prompt takes its place).
- READY: waits for a buffer position. Positions go in deadline order (`may_store`), and only
  while the window is open (`window_full`).
- STORING: holds position p; groups are appended one at a time in position order, each in one
  transaction with the journal's pending changes. Nothing is dropped on `BufferFull` (it waits);
  a store that fails otherwise is LOST (another prompt takes its place); one that met a Redis
  error is IN_DOUBT until recovery rebuilds the pipeline from what Redis says.

The counts admission reads are the stages' sizes (`num_running`, `num_accepted`), so they cannot
drift from where the groups are.

`dispatch()` does whatever may be done now: give ready groups their positions; then, if the
window is full, abort what still runs (it is recycled as partials); otherwise hand queued
samples to streams with room and admit new groups while one could take a whole group. Every
event ends with it.

The pipeline reaches out only through its `Ports` and its journal (`Journaling`); server.py binds
them to the streams, the reward service and Redis. Everything runs on one asyncio loop, so no
locks. A Redis reload never resets a pipeline: recovery.py `close()`s it (its tasks are
cancelled, so nothing it started lands) and builds a new one from the journal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from slipstream.algorithms.staleness import StalenessBound
from slipstream.buffer.coordinator_store import CoordinatorCounters
from slipstream.buffer.replay import BufferFull
from slipstream.config import RolloutConfig
from slipstream.proto import coordinator_pb2, types_pb2
from slipstream.rollout_filters import FilterFn, kept
from slipstream.rpc.convert import SampleError, check_sample, sample_from_proto
from slipstream.services.coordinator.admission import may_store, num_stale
from slipstream.services.coordinator.dispatch_log import DispatchLog
from slipstream.services.coordinator.groups import (
    RUNNING,
    GroupState,
    Ledger,
    Slots,
    Stage,
    Stages,
    StaleResult,
    pick_server,
)
from slipstream.services.coordinator.journal import StoreInDoubt, to_record
from slipstream.services.coordinator.partials import Partials
from slipstream.services.coordinator.prompts import Prompts, sampling_params, work_item

if TYPE_CHECKING:
    from slipstream.services.coordinator.scoring import Scored

log = logging.getLogger(__name__)

BUFFER_FULL_RETRY_S = 1.0
STORE_BATCH = 64  # groups per store transaction at most
EPOCH_BITS = 32  # lease epochs are (incarnation << EPOCH_BITS) + a per-sample count

_ARROWS = {
    Stage.GENERATING: {Stage.SCORING},
    Stage.SCORING: {Stage.READY, Stage.FILTERED},
    Stage.READY: {Stage.STORING},
    Stage.STORING: {Stage.STORED, Stage.LOST, Stage.IN_DOUBT},
}


@dataclass(frozen=True)
class PipelineSettings:
    rollout: RolloutConfig  # group size, sampling parameters, prompt and response limits
    bound: StalenessBound
    seed: int  # --seed: per-sample sampling seeds
    vocab_size: int = 0  # results are checked against it (0: unchecked)
    group_filter: FilterFn | None = None  # --dynamic-sampling-filter-path
    filter_args: Any = None  # what slime hooks receive as `args` (`cfg.as_namespace()`)

    @property
    def max_tokens(self) -> int:
        """The longest sample a result may hold: prompt and response limits together."""
        return self.rollout.rollout_max_prompt_len + self.rollout.rollout_max_response_len

    def keeps(self, group_id: str, samples: list[types_pb2.Sample]) -> bool:
        """Whether --dynamic-sampling-filter-path keeps the scored group (no filter: it does)."""
        if self.group_filter is None:
            return True
        return kept(
            self.group_filter, self.filter_args, [sample_from_proto(s) for s in samples], f"group {group_id}"
        )


OnRewardFailure = Callable[[types_pb2.Sample, str], None]


@dataclass(frozen=True)
class Ports:
    """What the pipeline asks of the world."""

    send: Callable[[str, coordinator_pb2.RolloutCommand], None]  # to one attached stream
    capacity: Callable[[], dict[str, int]]  # attached streams -> max concurrent samples
    version: Callable[[], int]  # the newest policy version (the weights relay's)
    finished: Callable[[], bool]  # the trainer is done: admit nothing more
    score: Callable[[list[types_pb2.Sample], OnRewardFailure], Awaitable[list[Scored]]]
    dead_letter: Callable[[types_pb2.Sample, str], Awaitable[None]]  # never raises
    park: Callable[[types_pb2.Sample], Awaitable[None]]  # into the partial stream
    take_partials: Callable[[int | None], Awaitable[list[types_pb2.Sample]]]  # None: all of them
    resync: Callable[[], None]  # Redis state is in doubt: rebuild from the journal
    reward_up: Callable[[], bool] = lambda: True  # False while the reward is unavailable (scoring.py)


class Journaling(Protocol):
    """Where a pipeline's changes go (journal.py's `Journal`)."""

    def mark(self, group_id: str) -> None: ...
    def drop(self, group_id: str) -> None: ...
    def touch(self) -> None: ...
    async def store_groups(self, groups: list[types_pb2.Group], stored: Callable[[], None]) -> None: ...


def _abort(work_ids: list[str]) -> coordinator_pb2.RolloutCommand:
    return coordinator_pb2.RolloutCommand(abort=coordinator_pb2.AbortWork(work_ids=work_ids))


class Pipeline:
    def __init__(
        self,
        settings: PipelineSettings,
        prompts: Prompts,
        ports: Ports,
        journal: Journaling,
        events: DispatchLog,
        counters: CoordinatorCounters,
    ):
        self.settings, self.bound, self.ports, self.journal = settings, settings.bound, ports, journal
        self.events = events
        self.counters = counters  # its `version` is the relay's: read at `snapshot`
        self.prompts = prompts
        self.cursor = prompts.cursor(counters.cursor)
        self.ledger = Ledger(epoch_base=counters.incarnation << EPOCH_BITS)
        self.stages = Stages()
        self.groups = self.stages.groups  # every group not stored, filtered nor lost
        self._sampling = sampling_params(settings.rollout)  # what every work item samples with
        self._aborting: set[str] = set()  # work ids an abort was sent for
        self.partials = Partials(
            self.ledger, ports.park, ports.take_partials, journal.mark, self._spawn, then=self.dispatch
        )
        self._to_store = asyncio.Event()  # a group became STORING
        self._storer: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- the state machine --------------------------------------------------------------
    def _move(self, group: GroupState, stage: Stage) -> None:
        if stage not in _ARROWS.get(group.stage, ()):
            raise RuntimeError(f"group {group.group_id} cannot go from {group.stage.name} to {stage.name}")
        self.stages.move(group, stage)

    @property
    def num_running(self) -> int:
        return self.stages.count(*RUNNING)

    @property
    def num_accepted(self) -> int:
        """Groups given a buffer position: stored, or being stored."""
        return self.counters.num_stored + self.stages.count(Stage.STORING, Stage.IN_DOUBT)

    @property
    def num_in_flight(self) -> int:
        return len(self.ledger.leases)

    def restore(self, group: GroupState, parked: set[int]) -> None:
        """Take a journaled group back: a complete one is scored again, the rest generated."""
        if group.complete:  # finished before the crash: score it again and store it
            self.stages.enter(group, Stage.SCORING)
            self._spawn(self._finish(group))
        else:
            self.stages.enter(group, Stage.GENERATING)
            self.ledger.restore_group(group, parked)

    def start(self) -> None:
        """After `restore`: take every parked partial back (the stream may have lost some)."""
        self.partials.take_all()

    # ---- admission and dispatch ---------------------------------------------------------
    def dispatch(self) -> None:
        """Give ready groups their positions, then hand out queued samples and admit new groups."""
        self._position_ready()
        if self.bound.window_full(self.ports.version(), self.num_accepted):
            # The trainer cannot take another group before the next version: recycle what still runs.
            self._abort_running()
            return
        self.partials.recycle()
        slots = {cid: Slots(self.ledger.in_flight(cid), cap) for cid, cap in self.ports.capacity().items()}
        n = self.settings.rollout.n_samples_per_prompt
        while True:
            placed = self.ledger.place_next(slots)
            if placed:
                for a in placed:
                    cmd = work_item(a, self._sampling, self.settings.seed, self.ports.version())
                    self.ports.send(a.conn_id, cmd)
                continue
            if self.ledger.has_queued or pick_server(n, slots) is None or not self._may_admit():
                return
            self._admit()

    def _may_admit(self) -> bool:
        # Parked partials go out before any new prompt: they are older work. While the reward is
        # down, no new prompt: it could only wait in SCORING (what was admitted still generates).
        return (
            not self.ports.finished()
            and self.ports.reward_up()
            and not self.ledger.parked
            and self.bound.may_dispatch(self.ports.version(), self.num_accepted, self.num_running)
        )

    def _admit(self) -> None:
        index, record = self.cursor.next()
        self.counters.cursor = self.cursor.position
        group_id = f"p{index}"
        samples = self.prompts.templates(group_id, index, record, self.settings.rollout.n_samples_per_prompt)
        version = self.ports.version()
        group = self.ledger.add_group(group_id, samples, version, self.bound.accept_limit(version))
        self.stages.enter(group, Stage.GENERATING)
        self.journal.mark(group_id)
        self.events.event("dispatched", group_id, [s.uid for s in samples])

    def _abort_running(self, why: str = "batch full", again: bool = False) -> None:
        """Abort what runs on every stream (`again`: also samples an abort was already sent for)."""
        for cid in self.ports.capacity():
            ids = [w for w in self.ledger.running_on(cid) if again or w not in self._aborting]
            if ids:
                self._aborting.update(ids)
                self.ports.send(cid, _abort(ids))
                log.info("%s: aborting %d samples on %s to recycle them", why, len(ids), cid)

    def abort_all(self) -> None:
        """This pipeline is being replaced: every sample leased out is aborted."""
        self._abort_running("replaced", again=True)

    # ---- what streams report ------------------------------------------------------------
    def on_results(self, conn_id: str, results: list[coordinator_pb2.SampleResult]) -> None:
        """A burst of results from one stream (one message): each taken in, then one dispatch."""
        for result in results:
            self._take_result(conn_id, result)
        self.dispatch()

    def on_result(self, conn_id: str, result: coordinator_pb2.SampleResult) -> None:
        self.on_results(conn_id, [result])

    def _take_result(self, conn_id: str, result: coordinator_pb2.SampleResult) -> None:
        sample = result.sample
        try:
            check_sample(sample, self.settings.vocab_size, self.settings.max_tokens)
        except SampleError as e:
            # Garbage from a server (ids past the vocabulary, NaN log-probs...) must not reach the
            # trainer: the sample counts as FAILED, with the prompt only, and the run goes on.
            log.warning("result from %s refused: %s", conn_id, e)
            if result.work_id in self.ledger.leases:
                sample = types_pb2.Sample()
                sample.CopyFrom(self.ledger.sample_of(result.work_id))
                sample.status = types_pb2.SAMPLE_STATUS_FAILED
        try:
            group = self.ledger.accept_result(conn_id, result.work_id, result.lease_epoch, sample)
        except StaleResult as e:
            log.info("ignored from %s: %s", conn_id, e)
            return
        self._aborting.discard(result.work_id)
        self.journal.mark(result.work_id.rsplit("/", 1)[0])
        if result.sample.status == types_pb2.SAMPLE_STATUS_ABORTED:
            self.counters.num_partials_recycled += 1
            self.partials.park(self.ledger.sample_of(result.work_id))
        if group is not None:
            self._move(group, Stage.SCORING)
            self._spawn(self._finish(group))

    def on_detach(self, conn_id: str) -> int:
        """A stream ended: its samples go to other streams. How many it held."""
        released = self.ledger.release(conn_id)
        self._aborting.intersection_update(self.ledger.leases)
        self.dispatch()
        return released

    def on_new_version(self) -> None:
        self.journal.touch()  # the version is journaled
        self.dispatch()  # a new version opens the staleness window

    # ---- scoring and the filter ---------------------------------------------------------
    async def _finish(self, group: GroupState) -> None:
        """Score a complete group, dead-letter what keeps failing, and run the dynamic filter."""
        samples = group.finished_samples()

        def failed(sample: types_pb2.Sample, error: str) -> None:
            log.warning("reward failed for %s: %s", sample.uid, error)
            self.events.event("reward_failed", group.group_id, [sample.uid])

        scored = await self.ports.score(samples, failed)
        dead = []
        for sample, result in zip(samples, scored, strict=True):
            if result.failed:
                sample.status = types_pb2.SAMPLE_STATUS_FAILED  # never trained on
                sample.reward = 0.0
                self.counters.num_reward_failures += 1
                self.counters.num_dead_lettered += 1
                dead.append((sample, f"reward failed {result.attempts} times: {result.error}"))
            else:
                sample.reward = result.reward
        for sample, reason in dead:
            await self.ports.dead_letter(sample, reason)
            self.events.event("dead_lettered", group.group_id, [sample.uid])
        if not self.settings.keeps(group.group_id, samples):
            self.counters.num_filtered += 1
            self._move(group, Stage.FILTERED)
            self.journal.drop(group.group_id)
            self.events.event("filtered", group.group_id, [s.uid for s in samples])
        else:
            self._move(group, Stage.READY)
        self.dispatch()

    # ---- positions and the store --------------------------------------------------------
    def _position_ready(self) -> None:
        """Give ready groups buffer positions, earliest deadline first, while the bound allows."""
        for group in sorted(self.stages.of(Stage.READY), key=lambda g: (g.deadline, g.entered)):
            accepted = self.num_accepted
            if self.bound.window_full(self.ports.version(), accepted):
                return
            if not may_store(accepted, group.deadline, self.stages.running_deadlines):
                return  # it would take a position an earlier, running group needs; so would any later one
            group.position = accepted
            self._move(group, Stage.STORING)
            self._count_stale(group)
            self._to_store.set()
            if self._storer is None:
                self._storer = self._spawn(self._store_in_order())

    def _count_stale(self, group: GroupState) -> None:
        if stale := num_stale(self.bound, group.position, group.finished_samples()):
            self.counters.num_stale_samples += stale
            log.warning(
                "group %s: %d samples hold tokens older than --max-staleness %d allows at position %d",
                group.group_id,
                stale,
                self.bound.max_staleness,
                group.position,
            )

    async def _store_in_order(self) -> None:
        """Append STORING groups to the buffer in position order, those waiting together in one
        transaction (one Redis round trip and one thread hop for a step's 64 groups, not 64)."""
        while True:
            storing = self.stages.of(Stage.STORING)
            if not storing:
                self._to_store.clear()
                await self._to_store.wait()
                continue
            await self._store(sorted(storing, key=lambda g: g.position)[:STORE_BATCH])
            self.dispatch()

    async def _store(self, groups: list[GroupState]) -> None:
        """Groups into the buffer: in the buffer and out of assembly together (journal.py). A Redis
        error leaves it unknown whether the transaction ran, so they are not retried: recovery
        reloads from Redis, which knows. Any other error wrote nothing: a batch is tried again one
        group at a time, and a group that fails alone is lost and replaced."""
        now = int(time.time() * 1000)
        pbs = [
            types_pb2.Group(group_id=g.group_id, samples=g.finished_samples(), created_unix_ms=now)
            for g in groups
        ]
        ids = ", ".join(g.group_id for g in groups)

        def stored() -> None:
            for group, pb in zip(groups, pbs, strict=True):
                self.counters.num_stored += 1
                self._move(group, Stage.STORED)
                self.events.event("stored", group.group_id, [s.uid for s in pb.samples])

        while True:
            try:
                await self.journal.store_groups(pbs, stored)
                return
            except BufferFull as e:  # backpressure: the groups wait, nothing is dropped
                log.warning("%s; retrying in %.0fs", e, BUFFER_FULL_RETRY_S)
                await asyncio.sleep(BUFFER_FULL_RETRY_S)
            except StoreInDoubt as e:
                log.warning("could not store groups %s (%s); reloading from Redis", ids, e)
                for group in groups:
                    self._move(group, Stage.IN_DOUBT)
                self.ports.resync()
                return
            except Exception:  # noqa: BLE001 - a lost group is replaced, the run goes on
                if len(groups) > 1:
                    for group in groups:
                        await self._store([group])
                    return
                log.exception("could not store group %s; it will be replaced", ids)
                for later in self.stages.of(Stage.STORING):
                    later.position -= later.position > groups[0].position  # they move up a place
                self._move(groups[0], Stage.LOST)
                return

    # ---- the journal and the end --------------------------------------------------------
    def snapshot(self, dirty: set[str]) -> tuple[CoordinatorCounters, dict[str, bytes]]:
        """Counters, and the records of the dirty groups still in assembly (stored ones are gone)."""
        put = {
            gid: to_record(self.groups[gid], self.ledger.parked).SerializeToString()
            for gid in dirty
            if gid in self.groups
        }
        return replace(self.counters, version=self.ports.version()), put

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel everything this pipeline started; nothing of it lands after this."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
