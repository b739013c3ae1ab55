"""`metrics.jsonl` (one JSON object per trainer step) and `summary.json` in the run directory."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from slipstream.types import Sample

from .batch import trainable

CORRECT = 1.0 - 1e-6  # a rule reward of 1.0 means the answer was right


def group_metrics(samples: list[Sample], trained_version: int) -> dict[str, Any]:
    """Reward, accuracy, length and staleness of the samples of one step."""
    ok = [s for s in samples if trainable(s)]
    rewards = [s.get_reward_value() for s in ok]
    staleness = [trained_version - min(s.policy_versions) for s in ok if s.policy_versions]
    return {
        "reward_mean": sum(rewards) / max(len(rewards), 1),
        "accuracy": sum(r >= CORRECT for r in rewards) / max(len(rewards), 1),
        "response_len_mean": sum(s.response_length for s in samples) / max(len(samples), 1),
        "staleness_mean": sum(staleness) / max(len(staleness), 1),
        "staleness_max": max(staleness, default=0),
        "num_samples": len(samples),
    }


def coordinator_counters(status: Any) -> dict[str, Any]:
    """Every scalar number of a `CoordinatorStatus` reply, as `coord_<field>`.

    Read from the message's descriptor, so counters the coordinator adds later (partials
    recycled, groups filtered, rollout idle fraction, ...) reach metrics.jsonl unchanged.
    """
    out: dict[str, Any] = {}
    for f in status.DESCRIPTOR.fields:
        if f.is_repeated or f.cpp_type in (f.CPPTYPE_MESSAGE, f.CPPTYPE_STRING, f.CPPTYPE_ENUM):
            continue  # maps and lists (server_versions), names: not counters
        value = getattr(status, f.name)
        out[f"coord_{f.name}"] = int(value) if f.cpp_type == f.CPPTYPE_BOOL else value
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    def __init__(self, run_dir: str):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.start = time.monotonic()
        self.rows: list[dict[str, Any]] = []

    def write(self, **row: Any) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        row["elapsed_s"] = round(time.monotonic() - self.start, 3)
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write_summary(self, **extra: Any) -> None:
        acc = [r["accuracy"] for r in self.rows]
        summary = {
            "num_steps": len(self.rows),
            "accuracy_first5": sum(acc[:5]) / max(len(acc[:5]), 1) if acc else None,
            "accuracy_last5": sum(acc[-5:]) / max(len(acc[-5:]), 1) if acc else None,
            "reward_mean_last5": (sum(r["reward_mean"] for r in self.rows[-5:]) / len(self.rows[-5:]))
            if self.rows
            else None,
            "tokens_per_s_mean": (sum(r["tokens_per_s"] for r in self.rows) / len(self.rows))
            if self.rows
            else None,
            "elapsed_s": round(time.monotonic() - self.start, 3),
            **extra,
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
