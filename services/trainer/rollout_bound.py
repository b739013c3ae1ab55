"""Says on the console when the trainer spends most of its steps waiting for samples.

With rollout and training overlapped (`--max-staleness` >= 1) a trainer that waits for the buffer
step after step is held back by the rollout side, and the run is slower than it needs to be; the
metrics say so (`wait_data_s`, `trainer_idle_frac`) but nobody reads them live. On issue 14's
H200 run (a 25 M-parameter model) one rollout server's per-sample host work held the trainer
idle two thirds of every step; four servers on the same GPU halved the step (docs/benchmarks.md).
Under `--sync` waiting is the schedule itself, so nothing is said.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from slipstream.console import console_log

WINDOW = 10  # steps looked at together
SHARE = 0.5  # of their time spent waiting for samples
SKIP = 2  # the first steps wait for the services' start-up and the first version


class RolloutBoundHint:
    """An observer of the trainer's metrics rows; warns once per run."""

    def __init__(self, max_staleness: int) -> None:
        self.enabled = max_staleness > 0
        self.window: deque[tuple[float, float]] = deque(maxlen=WINDOW)
        self.said = False

    def __call__(self, row: dict[str, Any]) -> None:
        if not self.enabled or self.said or row["step"] <= SKIP or not row.get("tokens_per_s"):
            return
        self.window.append((row["wait_data_s"], row["num_trained_tokens"] / row["tokens_per_s"]))
        waited, total = map(sum, zip(*self.window, strict=True))
        if len(self.window) == WINDOW and waited > SHARE * total:
            self.said = True
            console_log().warning(
                "the trainer waited for samples %.0f%% of steps %d-%d: rollout is the bottleneck; "
                "more rollout servers (--rollout-num-servers, on a shared GPU too) or a larger "
                "--rollout-max-batch-size would feed it faster",
                100 * waited / total, row["step"] - WINDOW + 1, row["step"],
            )  # fmt: skip
