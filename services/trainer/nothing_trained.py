"""A step that trained 0 tokens says so on the console, with why (issue 13: it was silent).

Each step's row in metrics.jsonl has `num_trained_tokens`; a 0 there means the optimizer saw
nothing, usually because every sample failed its reward (dead-lettered: see the dead-letter
stream), was dropped as too stale, or had an empty response. The launcher's console shows this
line (`slipstream.console`), so a run that trains on nothing is never a quiet progress bar.
"""

from __future__ import annotations

from slipstream.algorithms.staleness import StalenessReport
from slipstream.console import console_log
from slipstream.types import Sample, Status


def why_nothing_trained(samples: list[Sample], staleness: StalenessReport) -> str:
    n = len(samples)
    if n == 0:
        return "the batch held no samples"
    failed = sum(s.status is Status.FAILED for s in samples)
    if failed == n:
        return f"all {n} samples failed (reward failures: dead-lettered, see the dead-letter stream)"
    empty = sum(s.status is not Status.FAILED and s.response_length == 0 for s in samples)
    parts = [
        f"{failed} failed (reward failures)" if failed else "",
        f"{staleness.num_dropped} dropped as too stale (--max-staleness)" if staleness.num_dropped else "",
        f"{empty} with an empty response" if empty else "",
    ]
    said = ", ".join(p for p in parts if p)
    return f"of {n} samples: {said or 'none failed, every loss token masked'}"


def warn_if_nothing_trained(
    step: int, samples: list[Sample], staleness: StalenessReport, num_tokens: int
) -> None:
    if num_tokens == 0:
        console_log().warning("step %d trained 0 tokens: %s", step, why_nothing_trained(samples, staleness))
