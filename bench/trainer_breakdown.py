"""Where a trainer step's time goes, from a run's metrics.jsonl: waiting for data, compute, weight push.

    .venv/bin/python bench/trainer_breakdown.py runs/demo [--out bench/results/trainer_breakdown.json]

Every step row carries `wait_data_s` (blocked on the buffer), `compute_s` (log-prob recompute,
forward/backward, optimizer) and `push_weights_s` (FP8 pack + stream to the coordinator); the
rest of a step (acks, progress report, checkpoint) is `other_s`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summarize(rows: list[dict]) -> dict:
    steps = [r for r in rows if "compute_s" in r]
    total = [r["elapsed_s"] - p["elapsed_s"] for p, r in zip(steps, steps[1:], strict=False)]
    parts = {k: sum(r[k] for r in steps[1:]) for k in ("wait_data_s", "compute_s", "push_weights_s")}
    wall = sum(total)
    parts["other_s"] = max(wall - sum(parts.values()), 0.0)
    return {
        "num_steps": len(steps),
        "mean_step_s": wall / max(len(total), 1),
        "share": {k: round(v / wall, 3) if wall else None for k, v in parts.items()},
        "mean_s": {k: round(v / max(len(total), 1), 4) for k, v in parts.items()},
        "tokens_per_s_mean": sum(r["tokens_per_s"] for r in steps) / max(len(steps), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "trainer_breakdown.json"
    )
    args = parser.parse_args()
    rows = [
        json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    result = summarize(rows)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"bench": "trainer_breakdown", "run_dir": str(args.run_dir), **result}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
