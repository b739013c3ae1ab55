"""What the trainer has trained: per-group training counts, steps not yet committed, trained.jsonl.

Delivery from the buffer is at least once (a Redis restart can lose the last second of
acknowledgements; a coordinator can regenerate a group it thinks lost), so the trainer is the
one that makes training exactly once. Every group carries an id unique per dispatch
(`p<cursor index>`); `Consumption.trained` counts how many times each was trained, and an entry
asking for a training the group already had is a duplicate: acknowledged and skipped. A fresh
entry asks for training number 1; a reuse entry with `n` for number n+1 (`--max-reuse`).

A step's Redis commit (ack, reuse requeue) waits for the checkpoint that contains it
(`checkpointer.py`), so between checkpoints the steps trained since the last one wait here as
`StepRecord`s; the checkpoint stores them, the counts, and then Redis hears about them.

`trained.jsonl` in the run directory gets one line per checkpointed step, appended and flushed
to disk before Redis is told: `{"step", "group_ids", "entry_ids", "times_trained"}` (the count
of each group after the step). A resumed trainer appends the lines of its checkpoint's last
steps again (it cannot know whether the crash came before they were written); readers keep the
last line of each step number (`scripts/check_ledger.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slipstream.proto import types_pb2

LEDGER_FILE = "trained.jsonl"


@dataclass
class StepRecord:
    """One trained step, as its commit needs it: which entries to ack, which groups to requeue."""

    step: int
    group_ids: list[str]
    times_trained: list[int]  # per group, counting this step
    fresh_ids: list[str]  # groups-stream entries trained: acked at commit
    reused_ids: list[str]  # reuse-stream entries trained or expired: acked and deleted at commit
    requeue: list[tuple[str, int]] = field(default_factory=list)  # (group id, times trained so far)

    @property
    def entry_ids(self) -> list[str]:
        return self.fresh_ids + self.reused_ids

    def ledger_line(self) -> dict:
        return {
            "step": self.step,
            "group_ids": self.group_ids,
            "entry_ids": self.entry_ids,
            "times_trained": self.times_trained,
        }

    @staticmethod
    def from_json(d: dict) -> StepRecord:
        return StepRecord(
            step=d["step"],
            group_ids=list(d["group_ids"]),
            times_trained=list(d["times_trained"]),
            fresh_ids=list(d["fresh_ids"]),
            reused_ids=list(d["reused_ids"]),
            requeue=[(g, int(t)) for g, t in d.get("requeue", [])],
        )


@dataclass
class Consumption:
    """Training counts per group id, and the steps trained since the last checkpoint."""

    max_reuse: int = 1
    trained: dict[str, int] = field(default_factory=dict)
    uncommitted: list[StepRecord] = field(default_factory=list)
    groups: dict[str, types_pb2.Group] = field(default_factory=dict)  # of uncommitted requeues
    num_duplicates_skipped: int = 0

    def is_duplicate(self, group_id: str, training: int, planned: dict[str, int]) -> bool:
        """Would training number `training` of this group exceed what it had (or may have)?"""
        done = self.trained.get(group_id, 0) + planned.get(group_id, 0)
        return done >= training or done >= self.max_reuse

    def record(self, record: StepRecord, requeued: list[types_pb2.Group]) -> None:
        for gid, times in zip(record.group_ids, record.times_trained, strict=True):
            self.trained[gid] = times
        for g in requeued:
            self.groups[g.group_id] = g
        self.uncommitted.append(record)

    def take_uncommitted(self) -> tuple[list[StepRecord], dict[str, types_pb2.Group]]:
        records, groups = self.uncommitted, self.groups
        self.uncommitted, self.groups = [], {}
        return records, groups

    def to_json(self) -> dict:
        return {
            "trained": self.trained,
            "uncommitted_steps": [asdict(r) for r in self.uncommitted],
            "num_duplicates_skipped": self.num_duplicates_skipped,
        }

    @staticmethod
    def from_json(d: dict, max_reuse: int) -> tuple[Consumption, list[StepRecord]]:
        """The counts of a checkpoint, and its steps whose Redis commit may not have happened."""
        c = Consumption(max_reuse=max_reuse, trained={k: int(v) for k, v in d.get("trained", {}).items()})
        c.num_duplicates_skipped = int(d.get("num_duplicates_skipped", 0))
        return c, [StepRecord.from_json(r) for r in d.get("uncommitted_steps", [])]


class TrainedLedger:
    """`<run-dir>/trained.jsonl`, appended line by line and flushed to disk."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LEDGER_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, records: list[StepRecord]) -> None:
        if not records:
            return
        with self.path.open("a") as f:
            for r in records:
                f.write(json.dumps(r.ledger_line()) + "\n")
            f.flush()
            os.fsync(f.fileno())
