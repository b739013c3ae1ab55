"""The assignment ledger: GRPO groups in flight and the lease of every sample.

A group is one prompt times `n_samples_per_prompt` samples. Its samples wait in a FIFO
queue until a rollout server has room for them; all samples of a group go to the same
server when any server can hold them (the engine can then share the prompt's prefix).
Each dispatched sample holds a lease: (the attached stream it went to, an epoch). A result
counts only when it names the current epoch of a live lease; anything else is a late
answer from a server the coordinator already gave up on, and is ignored. When a stream
ends, its leases are released and the samples go back to the *front* of the queue with a
new epoch, so recovered work is served before new prompts are admitted.

A sample that comes back ABORTED is a partial trajectory: the ledger *parks* it (no lease,
not queued) while the pipeline writes it to the buffer's partial stream in Redis; when the
pipeline takes it back out, `resume` puts it at the front of the queue to be continued, with
what it generated so far, under newer weights.

A group's own life, past generation, is its `Stage` (the pipeline's state machine, pipeline.py);
the ledger holds the groups still GENERATING.

The ledger is plain bookkeeping: no I/O, no clock, no asyncio. The pipeline drives it.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections import Counter, deque
from dataclasses import dataclass, field

from slipstream.proto import types_pb2

log = logging.getLogger(__name__)


@dataclass
class Lease:
    conn_id: str  # the attached stream holding the sample
    epoch: int


class Stage(enum.Enum):
    """Where a group is in its life (pipeline.py moves it; each arrow is checked there)."""

    GENERATING = "generating"  # admitted: its samples are queued, leased or parked (the ledger's)
    SCORING = "scoring"  # every sample in: at the reward service, then the dynamic filter
    READY = "ready"  # scored and kept: waits for its buffer position (deadline order)
    STORING = "storing"  # holds buffer position `position`: appended in position order
    IN_DOUBT = "in_doubt"  # its store transaction met a Redis error: only a reload can tell if it ran
    STORED = "stored"  # in the buffer (the pipeline forgets it)
    FILTERED = "filtered"  # dropped by the dynamic filter; another prompt takes its place
    LOST = "lost"  # its store failed for good; another prompt takes its place


@dataclass
class GroupState:
    group_id: str
    samples: list[types_pb2.Sample]  # [n] templates: prompt tokens, uid, label
    results: dict[int, types_pb2.Sample] = field(default_factory=dict)  # index -> finished sample
    version: int = 0  # policy version it was admitted under: its samples are generated on >= this
    deadline: int = 0  # it must land among the first `deadline` groups of the buffer (admission.py)
    stage: Stage = Stage.GENERATING
    entered: int = 0  # when it entered its stage (the pipeline's move count): ties go to the earlier
    position: int = -1  # its buffer position, once STORING

    @property
    def complete(self) -> bool:
        return len(self.results) == len(self.samples)

    def finished_samples(self) -> list[types_pb2.Sample]:
        return [self.results[i] for i in range(len(self.samples))]


GONE = {Stage.STORED, Stage.FILTERED, Stage.LOST}  # the pipeline forgets these
RUNNING = {Stage.GENERATING, Stage.SCORING, Stage.READY}  # admitted, no buffer position yet


class Stages:
    """The pipeline's groups by stage, and how many running ones are due by each deadline: what
    every dispatch reads, kept as groups move instead of scanned for. Only `enter` and `move`
    change a group's stage, so none of it can drift from `group.stage`."""

    def __init__(self) -> None:
        self.groups: dict[str, GroupState] = {}  # every group not stored, filtered nor lost
        self.running_deadlines: Counter[int] = Counter()  # deadline -> running groups due by it
        self._of: dict[Stage, dict[str, GroupState]] = {stage: {} for stage in Stage}
        self._moves = itertools.count(1)

    def enter(self, group: GroupState, stage: Stage) -> None:
        """A group new to the pipeline (admitted or restored), or one leaving its stage."""
        group.stage, group.entered = stage, next(self._moves)
        if stage in GONE:
            del self.groups[group.group_id]
            return
        self.groups[group.group_id] = self._of[stage][group.group_id] = group
        if stage in RUNNING:
            self.running_deadlines[group.deadline] += 1

    def move(self, group: GroupState, stage: Stage) -> None:
        del self._of[group.stage][group.group_id]
        if group.stage in RUNNING:
            self.running_deadlines[group.deadline] -= 1
            if not self.running_deadlines[group.deadline]:
                del self.running_deadlines[group.deadline]
        self.enter(group, stage)

    def of(self, *stages: Stage) -> list[GroupState]:
        return [g for stage in stages for g in self._of[stage].values()]

    def count(self, *stages: Stage) -> int:
        return sum(len(self._of[stage]) for stage in stages)


@dataclass
class Assignment:
    """One sample handed to one stream: what becomes a `WorkItem`."""

    conn_id: str
    work_id: str
    epoch: int
    sample: types_pb2.Sample
    group_version: int = 0  # the group's admission version
    continued: bool = False  # a parked partial being continued


@dataclass
class Slots:
    """A stream's capacity as the dispatcher sees it."""

    in_flight: int
    max_concurrent: int

    @property
    def free(self) -> int:
        return self.max_concurrent - self.in_flight


def pick_server(need: int, slots: dict[str, Slots]) -> tuple[str, int] | None:
    """(stream, how many of `need` samples it takes) or None to wait.

    Least-loaded first among the streams with room for the whole chunk. A chunk larger than
    every stream's capacity could never go out whole, so it is split over the least-loaded
    stream with any room (otherwise it would wait forever).
    """
    whole = [(s.in_flight, -s.free, cid) for cid, s in slots.items() if s.free >= need]
    if whole:
        return min(whole)[2], need
    if all(s.max_concurrent < need for s in slots.values()):
        some = [(s.in_flight, -s.free, cid) for cid, s in slots.items() if s.free > 0]
        if some:
            cid = min(some)[2]
            return cid, slots[cid].free
    return None


class Ledger:
    def __init__(self, epoch_base: int = 0) -> None:
        self.groups: dict[str, GroupState] = {}
        self.leases: dict[str, Lease] = {}  # work_id -> lease of a dispatched sample
        self._where: dict[str, tuple[str, int]] = {}  # work_id -> (group_id, index)
        self._epochs: dict[str, int] = {}  # work_id -> last epoch issued
        self._queue: deque[tuple[str, list[int]]] = deque()  # (group_id, sample indices) to place
        self._in_flight: Counter[str] = Counter()  # conn_id -> leases held
        self.parked: set[str] = set()  # work ids of partials waiting in the partial stream
        self._continued: set[str] = set()  # work ids resumed from the partial stream
        # Every epoch issued is above this. A coordinator resumed from its journal sets it above
        # any epoch an earlier incarnation could have issued, so their late results are refused.
        self.epoch_base = epoch_base

    # ---- groups ------------------------------------------------------------------------
    def add_group(
        self, group_id: str, samples: list[types_pb2.Sample], version: int = 0, deadline: int = 0
    ) -> GroupState:
        if group_id in self.groups:
            raise ValueError(f"group {group_id} already exists")
        group = self.groups[group_id] = GroupState(group_id, samples, version=version, deadline=deadline)
        for i, s in enumerate(samples):
            self._where[s.uid] = (group_id, i)
        self._queue.append((group_id, list(range(len(samples)))))
        return group

    def restore_group(self, group: GroupState, parked: set[int]) -> None:
        """Put back a journaled group: its finished results kept, its parked partials parked
        (the pipeline takes them back from the partial stream), every other sample queued."""
        if group.group_id in self.groups:
            raise ValueError(f"group {group.group_id} already exists")
        self.groups[group.group_id] = group
        for i, s in enumerate(group.samples):
            self._where[s.uid] = (group.group_id, i)
            if i in parked:
                self.parked.add(s.uid)
            elif s.response_length > 0:  # a partial that was being continued: continue it again
                self._continued.add(s.uid)
        todo = [i for i in range(len(group.samples)) if i not in group.results and i not in parked]
        if todo:
            self._queue.append((group.group_id, todo))

    @property
    def num_queued(self) -> int:
        return sum(len(idx) for _, idx in self._queue)

    @property
    def has_queued(self) -> bool:
        return bool(self._queue)

    def in_flight(self, conn_id: str) -> int:
        return self._in_flight[conn_id]

    # ---- dispatch ----------------------------------------------------------------------
    def place_next(self, slots: dict[str, Slots]) -> list[Assignment]:
        """Lease the head of the queue to a stream (updating `slots`); [] when it must wait."""
        if not self._queue or not slots:
            return []
        group_id, indices = self._queue[0]
        choice = pick_server(len(indices), slots)
        if choice is None:
            return []
        conn_id, take = choice
        self._queue.popleft()
        if take < len(indices):
            self._queue.appendleft((group_id, indices[take:]))
        group = self.groups[group_id]
        out = []
        for i in indices[:take]:
            sample = group.samples[i]
            epoch = max(self._epochs.get(sample.uid, 0), self.epoch_base) + 1
            self._epochs[sample.uid] = epoch
            self.leases[sample.uid] = Lease(conn_id, epoch)
            out.append(
                Assignment(conn_id, sample.uid, epoch, sample, group.version, sample.uid in self._continued)
            )
        slots[conn_id].in_flight += take
        self._in_flight[conn_id] += take
        return out

    def release(self, conn_id: str) -> int:
        """Give up every lease of a gone stream; its samples go back to the front of the queue."""
        by_group: dict[str, list[int]] = {}
        for work_id, lease in list(self.leases.items()):
            if lease.conn_id == conn_id:
                del self.leases[work_id]
                group_id, index = self._where[work_id]
                by_group.setdefault(group_id, []).append(index)
        self._in_flight.pop(conn_id, None)
        for group_id, indices in reversed(list(by_group.items())):
            self._queue.appendleft((group_id, sorted(indices)))
        return sum(len(v) for v in by_group.values())

    # ---- results -----------------------------------------------------------------------
    def accept_result(
        self, conn_id: str, work_id: str, epoch: int, sample: types_pb2.Sample
    ) -> GroupState | None:
        """Record a result; the group when this result completed it (it leaves the ledger).

        An ABORTED result is a partial trajectory: it replaces the sample's template and is
        queued again to be continued.

        Raises `StaleResult` for an unknown work id, an old epoch or another stream's lease.
        """
        lease = self.leases.get(work_id)
        if lease is None:
            raise StaleResult(f"result for {work_id!r}: no live lease (unknown or already done)")
        if lease.epoch != epoch or lease.conn_id != conn_id:
            raise StaleResult(f"result for {work_id!r}: epoch {epoch}, lease is at epoch {lease.epoch}")
        del self.leases[work_id]
        self._in_flight[conn_id] -= 1
        group_id, index = self._where[work_id]
        group = self.groups[group_id]
        template = group.samples[index]
        done = types_pb2.Sample()
        done.CopyFrom(sample)
        # Identity and ground truth come from the ledger, not from the server's echo.
        done.uid, done.group_index, done.index = template.uid, template.group_index, template.index
        done.prompt, done.label, done.metadata_json = template.prompt, template.label, template.metadata_json
        if done.status == types_pb2.SAMPLE_STATUS_ABORTED:
            # A partial trajectory: parked until the pipeline resumes it from the partial stream;
            # it is then continued (possibly elsewhere, under newer weights) from where it stopped.
            group.samples[index] = done
            self.parked.add(work_id)
            return None
        group.results[index] = done
        if not group.complete:
            return None
        del self.groups[group_id]
        for s in group.samples:
            self._where.pop(s.uid, None)
            self._epochs.pop(s.uid, None)
            self._continued.discard(s.uid)
        return group

    def resume(self, partial: types_pb2.Sample) -> bool:
        """Queue a parked partial (back from the partial stream) first; False if nobody waits for it."""
        if partial.uid not in self.parked:
            return False
        self.parked.discard(partial.uid)
        group_id, index = self._where[partial.uid]
        sample = types_pb2.Sample()
        sample.CopyFrom(partial)
        sample.status = types_pb2.SAMPLE_STATUS_PENDING
        self.groups[group_id].samples[index] = sample
        self._continued.add(partial.uid)
        self._queue.appendleft((group_id, [index]))
        return True

    def sample_of(self, work_id: str) -> types_pb2.Sample:
        """The ledger's current copy of a sample in flight (a parked partial: what it generated)."""
        group_id, index = self._where[work_id]
        return self.groups[group_id].samples[index]

    def running_on(self, conn_id: str) -> list[str]:
        """Work ids leased to a stream."""
        return [w for w, lease in self.leases.items() if lease.conn_id == conn_id]


class StaleResult(Exception):
    """A result that no live lease is waiting for (ignored, logged)."""
