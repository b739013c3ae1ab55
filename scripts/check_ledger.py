#!/usr/bin/env python3
"""Check a run's accounting: every dispatched group trained or accounted for, none twice.

    python scripts/check_ledger.py runs/latest [--max-reuse K]

Reads the trainer's `<run-dir>/trained.jsonl` (one line per checkpointed step; the last line of
each step number wins, since a resumed trainer writes its checkpoint's last steps again) and the
coordinator's `<run-dir>/dispatch.jsonl` (one event per line: dispatched, stored, filtered,
dead_lettered, reward_failed; per group or per sample uid). Prints a one-screen report and
exits 1 when an invariant fails:

- no group trained more than --max-reuse times, and no training number counted twice
  (a group trained as its first training in two steps is a duplicate even when K allows two);
- no group trained that was never dispatched (only checked when dispatch.jsonl exists).

--max-reuse defaults to the run's config.json (train.max_reuse), else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path


class LedgerError(ValueError):
    """A ledger file that cannot be read: its path and line in the message."""


def _lines(path: Path) -> list[dict]:
    out = []
    text = path.read_text().splitlines()
    for n, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(text):  # a torn last line: the writer died mid-write
                break
            raise LedgerError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise LedgerError(f"{path}:{n}: not a JSON object")
        out.append(row)
    return out


def trained_steps(path: Path) -> dict[int, dict]:
    """Step number -> the last line written for it."""
    steps: dict[int, dict] = {}
    for row in _lines(path):
        try:
            steps[int(row["step"])] = {
                "group_ids": [str(g) for g in row["group_ids"]],
                "times_trained": [int(t) for t in row.get("times_trained", [1] * len(row["group_ids"]))],
            }
        except (KeyError, TypeError, ValueError) as e:
            raise LedgerError(f"{path}: step line without a usable {e}: {row}") from None
    return steps


@dataclass
class Report:
    max_reuse: int
    steps: int = 0
    missing_steps: list[int] = field(default_factory=list)
    trainings: dict[str, list[int]] = field(default_factory=dict)  # group id -> training numbers
    dispatch_file: bool = False
    events: dict[str, set[str]] = field(default_factory=dict)  # event -> group ids

    @property
    def trained_too_often(self) -> list[str]:
        return sorted(
            g for g, ts in self.trainings.items() if len(ts) > self.max_reuse or len(set(ts)) != len(ts)
        )

    @property
    def never_dispatched(self) -> list[str]:
        if not self.dispatch_file:
            return []
        return sorted(set(self.trainings) - self.events.get("dispatched", set()))

    @property
    def ok(self) -> bool:
        return not self.trained_too_often and not self.never_dispatched

    def lines(self) -> list[str]:
        counts = Counter(len(ts) for ts in self.trainings.values())
        out = [f"trained steps             {self.steps}"]
        if self.missing_steps:
            out.append(f"  steps without a line    {_few(self.missing_steps)}")
        out.append(f"groups trained            {len(self.trainings)}")
        for k in sorted(counts):
            out.append(f"  trained {k}x              {counts[k]}")
        if self.dispatch_file:
            ev = self.events
            dispatched = ev.get("dispatched", set())
            settled = ev.get("stored", set()) | ev.get("filtered", set())
            waiting = ev.get("stored", set()) - set(self.trainings)
            out += [
                f"groups dispatched         {len(dispatched)}",
                f"  stored                  {len(ev.get('stored', set()))}",
                f"  filtered                {len(ev.get('filtered', set()))}",
                f"  with dead-lettered      {len(ev.get('dead_lettered', set()))}",
                f"  with reward failures    {len(ev.get('reward_failed', set()))}",
                f"  in flight at the end    {len(dispatched - settled)}",
                f"  stored, not trained     {len(waiting)} (in the buffer at the end)",
            ]
        else:
            out.append("dispatch.jsonl            missing: checked the trained side only")
        out += [
            f"trained beyond --max-reuse {self.max_reuse} or twice: {len(self.trained_too_often)} "
            f"{_few(self.trained_too_often)}  (must be 0)",
        ]
        if self.dispatch_file:
            out.append(
                f"trained, never dispatched: {len(self.never_dispatched)} {_few(self.never_dispatched)}  (must be 0)"
            )
        out.append("OK" if self.ok else "FAILED")
        return out


def _few(items: list, n: int = 5) -> str:
    return "" if not items else "[" + ", ".join(map(str, items[:n])) + (", ...]" if len(items) > n else "]")


def check(run_dir: Path, max_reuse: int | None = None) -> Report:
    if max_reuse is None:
        max_reuse = 1
        config = run_dir / "config.json"
        if config.is_file():
            max_reuse = int(json.loads(config.read_text()).get("train", {}).get("max_reuse", 1))
    report = Report(max_reuse=max_reuse)
    trained = run_dir / "trained.jsonl"
    if not trained.is_file():
        raise LedgerError(f"{trained}: no trained ledger (did the trainer checkpoint any step?)")
    steps = trained_steps(trained)
    report.steps = len(steps)
    if steps:
        report.missing_steps = sorted(set(range(1, max(steps) + 1)) - set(steps))
    trainings: dict[str, list[int]] = defaultdict(list)
    for step in sorted(steps):
        for gid, times in zip(steps[step]["group_ids"], steps[step]["times_trained"], strict=False):
            trainings[gid].append(times)
    report.trainings = dict(trainings)
    dispatch = run_dir / "dispatch.jsonl"
    if dispatch.is_file():
        report.dispatch_file = True
        events: dict[str, set[str]] = defaultdict(set)
        for row in _lines(dispatch):
            if "event" in row and "group_id" in row:
                events[str(row["event"])].add(str(row["group_id"]))
        report.events = dict(events)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--max-reuse", type=int, default=None, help="default: the run's config.json, else 1")
    args = p.parse_args(argv)
    try:
        report = check(args.run_dir, args.max_reuse)
    except (LedgerError, OSError) as e:
        print(f"check_ledger: error: {e}", file=sys.stderr)
        return 2
    print(f"ledger of {args.run_dir}")
    for line in report.lines():
        print(f"  {line}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
