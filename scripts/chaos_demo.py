"""The demo under faults: a rollout server killed, the coordinator and Redis each killed and restarted.

    .venv/bin/python scripts/chaos_demo.py [--run-dir runs/chaos-demo] [demo flags...]

Runs `slipstream demo` with `--max-restarts 1` (the launcher restarts what dies, on the same
port; Redis on its AOF) and, as training goes, SIGKILLs one process at a time:

    step 15: rollout-1      (its leases go to rollout-0; the launcher starts it again)
    step 35: coordinator    (restarted; resumes from its journal in Redis; servers re-attach)
    step 55: redis          (restarted on its AOF; loses at most ~1 s of writes)

Then it joins the coordinator's dispatch ledger with the trainer's trained ledger
(`scripts/check_ledger.py`: every dispatched group trained or accounted for, none twice) and
checks the demo's accuracy target. Writes `<run-dir>/chaos_report.json`; exit 0 only when
the demo target is met and the ledger holds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULTS = [(15, "rollout-1"), (35, "coordinator"), (55, "redis")]


def _last_step(metrics: Path) -> int:
    try:
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/chaos-demo")
    args, demo_flags = parser.parse_known_args()
    run_dir = Path(args.run_dir)
    cmd = [
        sys.executable, "-m", "slipstream", "demo", "--run-dir", str(run_dir),
        "--max-restarts", "1", *demo_flags,
    ]  # fmt: skip
    print("running:", " ".join(cmd), flush=True)
    demo = subprocess.Popen(cmd, cwd=ROOT)
    metrics = run_dir / "metrics.jsonl"
    report: dict = {"faults": []}
    pending = list(FAULTS)
    try:
        while demo.poll() is None:
            step = _last_step(metrics)
            if pending and step >= pending[0][0]:
                at, victim = pending.pop(0)
                pid = json.loads((run_dir / "pids.json").read_text())[victim]
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                print(f"chaos: step {step}: SIGKILL {victim} (pid {pid})", flush=True)
                # Recovered = the trainer commits another step after the kill.
                while demo.poll() is None and _last_step(metrics) <= step:
                    time.sleep(0.1)
                recovered = time.monotonic() - killed
                report["faults"].append(
                    {"step": step, "victim": victim, "next_step_after_s": round(recovered, 2)}
                )
                print(f"chaos: next step {recovered:.1f} s after killing {victim}", flush=True)
            time.sleep(0.2)
    finally:
        if demo.poll() is None:
            demo.terminate()
            demo.wait(timeout=30)
    report["demo_exit_code"] = demo.returncode
    report["faults_not_injected"] = [victim for _, victim in pending]
    ledger = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_ledger.py"), str(run_dir)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    print(ledger.stdout + ledger.stderr, flush=True)
    report["ledger_ok"] = ledger.returncode == 0
    report["ledger"] = ledger.stdout.strip().splitlines()
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        report["accuracy_first5"] = summary.get("accuracy_first5")
        report["accuracy_last5"] = summary.get("accuracy_last5")
        report["held_out_greedy_before"] = summary.get("held_out_greedy_before")
        report["held_out_greedy_after"] = summary.get("held_out_greedy_after")
    (run_dir / "chaos_report.json").write_text(json.dumps(report, indent=2) + "\n")
    ok = demo.returncode == 0 and report["ledger_ok"] and not pending
    print(f"chaos demo: {'PASSED' if ok else 'FAILED'}; report in {run_dir / 'chaos_report.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
