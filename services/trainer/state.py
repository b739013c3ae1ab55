"""What the trainer process knows about its run: the step, the policy version, run counters.

One `TrainerState` per process, shared with the gRPC servicer (GetState), the SIGTERM handler
(`stop`) and the metrics observers; a checkpoint records it (`checkpoint_meta`) and a resumed
trainer restores it (`restore`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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

    def count_optimizer_steps(self, num_optimizer_steps: int, num_skipped_steps: int) -> None:
        """A rollout step whose every optimizer step was skipped left the weights as they were."""
        self.num_skipped_steps += num_skipped_steps
        if num_optimizer_steps == 0 and num_skipped_steps > 0:
            self.nonfinite_in_a_row += num_skipped_steps
        elif num_optimizer_steps > 0:
            self.nonfinite_in_a_row = 0

    @property
    def idle_frac(self) -> float:
        """The share of the run's step time spent waiting for data."""
        return self.wait_data_s / max(self.busy_s, 1e-9)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "policy_version": self.policy_version,
            "num_groups_consumed": self.num_groups_consumed,
            "num_group_trainings": self.num_group_trainings,
            "num_skipped_steps": self.num_skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """The counters of a checkpoint's trainer_state.json (older checkpoints lack some)."""
        self.step, self.policy_version = saved["step"], saved["policy_version"]
        self.num_groups_consumed = saved.get("num_groups_consumed", 0)
        self.num_group_trainings = saved.get("num_group_trainings", self.num_groups_consumed)
        self.num_skipped_steps = saved.get("num_skipped_steps", 0)
        self.nonfinite_in_a_row = saved.get("nonfinite_in_a_row", 0)
