"""Issue 3's async-against-sync and stability measurements, on the demo, as one command.

    .venv/bin/python bench/async_vs_sync.py [--num-rollout 100] [--out bench/results/async_vs_sync.json]
        [--only NAME ...] [--seeds 1234 7 ...] [--parallel N] [demo flags for every run, e.g. --lr 2e-4]

Runs `slipstream demo` (its settings unchanged, warm start shared from runs/demo/prep) one run
after another -- never in parallel, the box has 2 cores -- as

    sync            --sync                         (generate, train, update, repeat)
    staleness-1     --max-staleness 1              (the demo itself: decoupled PPO + TIS)
    staleness-2     --max-staleness 2
    staleness-4     --max-staleness 4
    staleness-4-plain --max-staleness 4 --no-use-tis   (proximal log-probs recomputed, no TIS)
    staleness-4-naive --max-staleness 4 --no-use-tis --use-rollout-logprobs   (plain PPO)

plus two corrections at staleness 4 on top of TIS (MIS masking tokens whose behaviour ratio
leaves [0.5, 2]; TIS at sequence level), and reads each run's metrics.jsonl. `--seeds` repeats
each variant per RL seed (the warm start is shared); `--parallel N` runs N at once, for a
machine with the cores for it (each run's async timing then shares the CPUs). "Time to 0.85" is the `elapsed_s` (trainer wall clock since
its first step) of the first step whose 5-step trailing moving average of sampled accuracy
reaches 0.85; "final accuracy" is the mean over the last 5 steps (the demo's own yardstick).
Sampled accuracy at temperature 1 is noisy (512 samples a step), so both figures are single
runs of one seed: read differences of a few hundredths as noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREP = "runs/demo/prep"
TARGET = 0.85
WINDOW = 5

VARIANTS: dict[str, list[str]] = {
    "sync": ["--sync"],
    "staleness-1": ["--max-staleness", "1"],
    "staleness-2": ["--max-staleness", "2"],
    "staleness-4": ["--max-staleness", "4"],
    "staleness-4-plain": ["--max-staleness", "4", "--no-use-tis"],
    # AReaL's "naive PPO": the behaviour policy's own log-probs as the old policy, no TIS.
    "staleness-4-naive": ["--max-staleness", "4", "--no-use-tis", "--use-rollout-logprobs"],
    "staleness-4-mis": ["--max-staleness", "4", "--use-mis", "--mis-low", "0.5", "--mis-high", "2.0"],
    "staleness-4-seq": ["--max-staleness", "4", "--tis-level", "sequence"],
}


def time_to(rows: list[dict], target: float = TARGET, window: int = WINDOW) -> tuple[int, float] | None:
    """(step, elapsed_s) of the first step whose trailing `window`-step mean accuracy is >= target."""
    acc = [r["accuracy"] for r in rows]
    for i in range(window - 1, len(rows)):
        if sum(acc[i - window + 1 : i + 1]) / window >= target:
            return rows[i]["step"], rows[i]["elapsed_s"]
    return None


def summarize(rows: list[dict]) -> dict:
    steps = [r for r in rows if "accuracy" in r and "elapsed_s" in r]
    hit = time_to(steps)
    last = steps[-WINDOW:]
    return {
        "num_steps": len(steps),
        "wall_s": steps[-1]["elapsed_s"] if steps else None,
        "step_to_target": hit[0] if hit else None,
        "time_to_target_s": hit[1] if hit else None,
        "accuracy_first5": sum(r["accuracy"] for r in steps[:WINDOW]) / max(len(steps[:WINDOW]), 1),
        "accuracy_last5": sum(r["accuracy"] for r in last) / max(len(last), 1),
        "staleness_max_seen": max((r.get("staleness_max") or 0) for r in steps) if steps else None,
        "staleness_mean": sum((r.get("staleness_mean") or 0) for r in steps) / max(len(steps), 1),
    }


def run_variant(
    name: str, flags: list[str], num_rollout: int, run_root: str, seed: int | None = None
) -> dict:
    run_dir = f"{run_root}/{name}"
    seeded = ["--seed", str(seed)] if seed is not None else []
    cmd = [
        sys.executable, "-m", "slipstream", "demo",
        "--hf-checkpoint", f"{PREP}/model", "--prompt-data", f"{PREP}/train.jsonl",
        "--run-dir", run_dir, "--num-rollout", str(num_rollout), *flags, *seeded,
    ]  # fmt: skip
    print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    # The demo exits 3 when its own accuracy promise is missed: that is a result, not a failure.
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = ROOT / run_dir / "metrics.jsonl"
    if proc.returncode not in (0, 3) or not metrics.exists():
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise SystemExit(f"async_vs_sync: run {name} failed (exit {proc.returncode}):\n{tail}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    out = {"flags": flags + seeded, "run_dir": run_dir, "process_wall_s": round(time.monotonic() - t0, 1)}
    out["accuracy_by_10_steps"] = [
        round(sum(r["accuracy"] for r in rows[i : i + 10]) / len(rows[i : i + 10]), 3)
        for i in range(0, len(rows), 10)
    ]
    out.update(summarize(rows))
    print(f"[{name}] {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-rollout", type=int, default=100, help="RL steps per run (the demo's 100)")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run a subset of the variants")
    parser.add_argument("--seeds", nargs="*", type=int, help="RL seeds; each variant runs once per seed")
    parser.add_argument(
        "--parallel", type=int, default=1, help="runs at once (default 1: the box has 2 cores)"
    )
    parser.add_argument("--run-root", default="runs/bench-async")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "async_vs_sync.json")
    args, common = parser.parse_known_args()  # the rest goes to every run (e.g. --lr 2e-4)

    names = args.only or list(VARIANTS)
    runs: dict[str, dict] = {}
    if args.only and args.out.exists():  # a subset re-run joins the runs already measured
        runs = json.loads(args.out.read_text())["runs"]
    jobs = [(n, None) for n in names] if not args.seeds else [(n, s) for n in names for s in args.seeds]

    def one(job: tuple[str, int | None]) -> tuple[str, dict]:
        name, seed = job
        key = name if seed is None else f"{name}@{seed}"
        return key, run_variant(key, VARIANTS[name] + common, args.num_rollout, args.run_root, seed)

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        runs.update(dict(pool.map(one, jobs)))
    sync = runs.get("sync") or next((r for k, r in runs.items() if k.startswith("sync@")), None)
    for r in runs.values():
        t, ts = r["time_to_target_s"], sync and sync["time_to_target_s"]
        r["time_ratio_to_sync"] = round(t / ts, 3) if t and ts else None
        r["final_gap_to_sync"] = round(r["accuracy_last5"] - sync["accuracy_last5"], 4) if sync else None
    result = {
        "bench": "async_vs_sync",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, torch CPU",
        "target": f"first step whose {WINDOW}-step moving average of sampled accuracy >= {TARGET}",
        "num_rollout": args.num_rollout,
        "command": "bench/async_vs_sync.py " + " ".join(sys.argv[1:]),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
