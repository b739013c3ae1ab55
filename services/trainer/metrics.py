"""`metrics.jsonl` (one JSON object per trainer step) and `summary.json` in the run directory.

A step's row (`step_row`) holds what the step trained (rewards, staleness, the groups and where
they came from), what training measured (`StepStats`: loss, gradient norm, importance weights,
masking), where the time went, the run's counters, and every counter of the coordinator's reply
to the step's progress report. Observers (Prometheus, `slipstream.telemetry`) get the same row.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slipstream.algorithms.staleness import StalenessReport
from slipstream.types import Sample, Status

from .feed import StepGroups
from .state import TrainerState
from .step_metrics import StepStats

log = logging.getLogger("slipstream.trainer")

CORRECT = 1.0 - 1e-6  # a rule reward of 1.0 means the answer was right


def group_metrics(samples: list[Sample], trained_version: int) -> dict[str, Any]:
    """Reward, accuracy, length and staleness of the samples of one step."""
    ok = [s for s in samples if s.is_trainable]
    rewards = [s.get_reward_value() for s in ok]
    staleness = [trained_version - min(s.policy_versions) for s in ok if s.policy_versions]
    return {
        "reward_mean": sum(rewards) / max(len(rewards), 1),
        # None (null in metrics.jsonl) when no sample was scored: no accuracy, rather than 0.
        "accuracy": sum(r >= CORRECT for r in rewards) / len(rewards) if rewards else None,
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


@dataclass
class StepTimes:
    """Where a step's wall time went (seconds)."""

    wait_data_s: float  # reading the buffer
    compute_s: float  # scores, staleness policy, training
    push_weights_s: float  # packing and pushing a new version (0 when none was due)
    total_s: float  # the whole step, the progress report included

    @property
    def commit_s(self) -> float:
        """After training, besides the push: the buffer's record and the progress report."""
        return self.total_s - self.wait_data_s - self.compute_s - self.push_weights_s


def step_row(
    state: TrainerState,
    *,
    trained_version: int,
    samples: list[Sample],
    staleness: StalenessReport,
    stats: StepStats,
    batch: StepGroups,
    num_requeued: int,
    num_duplicates_skipped: int,
    times: StepTimes,
    status: Any,
) -> dict[str, Any]:
    """The metrics.jsonl row of the step `state` has just finished."""
    mis_masked = stats.metrics.get("mis_masked_frac", 0.0) * stats.num_tokens
    response_tokens = max(staleness.num_response_tokens, 1)
    return dict(
        step=state.step,
        policy_version=state.policy_version,
        trained_version=trained_version,
        **group_metrics(samples, trained_version),
        staleness_hist=staleness.hist_json(),
        num_stale=staleness.num_stale,
        num_stale_dropped=staleness.num_dropped,
        logprob_abs_diff_mean=stats.logprob_abs_diff_mean,
        loss=stats.loss,
        grad_norm=stats.grad_norm,
        pg_clipfrac=stats.pg_clipfrac,
        tis_mean=stats.tis_mean,
        **stats.metrics,
        offpolicy_masked_frac=staleness.num_offpolicy_masked_tokens / response_tokens,
        masked_frac=1.0 - (stats.num_tokens - mis_masked) / response_tokens,
        num_trained_tokens=stats.num_tokens,
        num_fresh_groups=len(batch.fresh),
        num_reused_groups=len(batch.reused),
        num_requeued_groups=num_requeued,
        num_reuse_expired=len(batch.expired),
        num_group_trainings=state.num_group_trainings,
        num_duplicates_skipped=num_duplicates_skipped,
        tokens_per_s=stats.num_tokens / max(times.total_s, 1e-9),
        wait_data_s=times.wait_data_s,
        compute_s=times.compute_s,
        push_weights_s=times.push_weights_s,
        commit_s=times.commit_s,
        trainer_idle_frac=times.wait_data_s / max(times.total_s, 1e-9),
        trainer_idle_frac_run=state.idle_frac,
        num_optimizer_steps=stats.num_optimizer_steps,
        num_skipped_steps=stats.num_skipped_steps,
        num_nonfinite_in_a_row=state.nonfinite_in_a_row,
        num_failed=sum(s.status is Status.FAILED for s in samples),
        **coordinator_counters(status),
    )


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
        row["unix_s"] = round(time.time(), 3)  # to line rows up with logs and other processes
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("%s", step_line(row))

    def write_summary(self, **extra: Any) -> None:
        acc = [r["accuracy"] for r in self.rows if r.get("accuracy") is not None]
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
        log.info("%s", summary_line(summary))


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None:
        return "none"
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def step_line(row: dict[str, Any]) -> str:
    """trainer.log's line for one step (metrics.jsonl holds the whole row)."""
    return (
        f"step {row.get('step')}: reward {_num(row.get('reward_mean'))} acc {_num(row.get('accuracy'))} "
        f"({row.get('num_samples', 0)} samples, {row.get('num_failed', 0)} failed) "
        f"loss {_num(row.get('loss'), '.4g')} grad_norm {_num(row.get('grad_norm'), '.3g')} "
        f"| {_num(row.get('num_trained_tokens'), 'd')} tokens, {_num(row.get('tokens_per_s'), '.0f')} tok/s, "
        f"wait {_num(row.get('wait_data_s'), '.2f')}s compute {_num(row.get('compute_s'), '.2f')}s "
        f"push {_num(row.get('push_weights_s'), '.2f')}s | v{row.get('policy_version')} "
        f"staleness {_num(row.get('staleness_mean'), '.2f')}"
    )


def summary_line(summary: dict[str, Any]) -> str:
    """trainer.log's last line of a run (summary.json holds it all)."""
    return (
        f"run done: {summary['num_steps']} steps in {summary['elapsed_s']:.1f}s, accuracy first 5 "
        f"{_num(summary['accuracy_first5'])} last 5 {_num(summary['accuracy_last5'])}, reward last 5 "
        f"{_num(summary['reward_mean_last5'])}, {_num(summary['tokens_per_s_mean'], '.0f')} tok/s mean, "
        f"policy v{summary.get('policy_version', '?')}, finished {summary.get('finished', '?')}"
    )
