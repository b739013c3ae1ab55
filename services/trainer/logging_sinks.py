"""TensorBoard and Weights & Biases: the rows of metrics.jsonl, sent on as they are written.

metrics.jsonl stays the record; a sink gets every numeric value of each row (rank 0 only, where
the rows are made), at the row's `step`. Names are metrics.jsonl's, except where slime logs the
same quantity: those take slime's name (`SLIME_NAMES`, the one table of renames), so a slime
user's dashboards and comparisons read our runs. slime prefixes by phase (train/, rollout/,
perf/); the metrics it has no counterpart for keep their metrics.jsonl names.

The packages are optional (`pip install 'slipstream[logging]'`); asking for a sink without its
package stops the trainer at start with one line naming the package
(`LoggingConfig.check_installed`). `--wandb-mode offline` writes a local run directory with no
network (`wandb sync` uploads it later).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from slipstream.config import Config

# metrics.jsonl name -> slime's name for the same quantity.
SLIME_NAMES = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr-pg_0",  # slime logs one per parameter group; we have one
    "pg_clipfrac": "train/pg_clipfrac",
    "ppo_kl": "train/ppo_kl",
    "kl_loss": "train/kl_loss",
    "entropy": "train/entropy_loss",  # slime's entropy_loss is the mean token entropy
    "logprob_abs_diff_mean": "train/train_rollout_logprob_abs_diff",
    "reward_mean": "rollout/raw_reward",
    "response_len_mean": "rollout/response_len/mean",
    "wait_data_s": "perf/train_wait_time",
    "compute_s": "perf/train_time",
    "trainer_idle_frac": "perf/wait_time_ratio",
}


NOT_SERIES = {"step", "unix_s"}  # the x axis, and the row's wall-clock time (each sink keeps its own)


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric values under their logged names (not `NOT_SERIES`)."""
    out = {}
    for key, value in row.items():
        if key in NOT_SERIES or isinstance(value, str | dict | list) or value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[SLIME_NAMES.get(key, key)] = value
    return out


class Sink(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), flush_secs=10)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, cfg: Config):
        import wandb

        lg, run_dir = cfg.logging, Path(cfg.infra.run_dir)
        directory = Path(lg.wandb_dir or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=lg.wandb_project,
            group=lg.wandb_group or None,
            name=lg.wandb_run_name or run_dir.resolve().name,
            mode=lg.wandb_mode,
            dir=str(directory),
            config=cfg.to_dict(),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricSinks:
    """Every sink asked for; `log` is a metrics-row observer (`TrainerState.observers`)."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        for sink in self.sinks:
            sink.log(values, int(row["step"]))

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_sinks(cfg: Config) -> MetricSinks:
    """The sinks of --use-tensorboard and --use-wandb (rank 0 only)."""
    lg = cfg.logging
    lg.check_installed()
    sinks: list[Sink] = []
    if lg.use_tensorboard:
        sinks.append(TensorBoard(Path(lg.tensorboard_dir or Path(cfg.infra.run_dir) / "tensorboard")))
    if lg.use_wandb:
        sinks.append(Wandb(cfg))
    return MetricSinks(sinks)
