"""Issue 13 item 8: time from launch to the first trained step, and from the last step to every
service stopped, for `train.py` (the whole mesh as separate processes).

    .venv/bin/python bench/startup_shutdown.py [--repeats 3] [--out bench/results/startup_shutdown.json]
    .venv/bin/python bench/startup_shutdown.py --hf-checkpoint M --prompt-data P -- <more train.py flags>

Measured from outside the launcher, so the same script times any version of it: the launch is
when the launcher process is started; the first and last steps are when `metrics.jsonl` gains
its first and its last (`--num-rollout`) row (polled every 20 ms); "stopped" is when the
"services down" is when no process of `pids.json` is left, "launcher exit" when the launcher
has exited (after writing the run report).
`PYTHONPATH=<an older tree>` times an older launcher and services with the same script. Without `--hf-checkpoint` it builds
the tests' tiny Qwen3 (the mesh tests' shape) and 64 demo prompts, so model load and compile
take next to nothing and what is measured is the mesh itself. Where the launcher writes
`<run-dir>/timeline.json` (the launcher's own timestamps: each service ready, first step, last
step, all stopped) the JSON carries it too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _rows(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def one_run(argv: list[str], run_dir: Path, steps: int) -> dict:
    metrics = run_dir / "metrics.jsonl"
    t0 = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    errors = (run_dir / "launcher.err").open("w+")
    launcher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors)
    first = last = down = None
    pids: dict[str, int] = {}
    while launcher.poll() is None or (down is None and time.monotonic() - (last or 0) < 60):
        n = _rows(metrics)
        now = time.monotonic()
        if n and first is None:
            first = now
        if n >= steps and last is None:
            last = now
            pids = json.loads((run_dir / "pids.json").read_text())
        if last is not None and down is None and not any(_alive(p) for p in pids.values()):
            down = now  # every service gone (the launcher may still be writing its report)
        if launcher.poll() is not None and (last is None or down is not None):
            break
        time.sleep(0.02)
    exited = time.monotonic()
    errors.seek(0)
    err = errors.read()
    if launcher.returncode != 0 or first is None or last is None or down is None:
        raise SystemExit(f"run failed (exit {launcher.returncode}):\n{err[-3000:]}")
    launcher.wait()
    out = {
        "first_step_s": round(first - t0, 2),
        "last_step_to_services_down_s": round(down - last, 2),
        "last_step_to_launcher_exit_s": round(exited - last, 2),
    }
    timeline = run_dir / "timeline.json"
    if timeline.exists():  # the launcher's own clock: services down before the report is written
        out["timeline"] = json.loads(timeline.read_text())
        out["timeline_first_step_s"] = out["timeline"]["first_step_s"]
        out["timeline_last_step_to_all_stopped_s"] = out["timeline"]["last_step_to_all_stopped_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-rollout", type=int, default=3)
    p.add_argument("--hf-checkpoint", default="")
    p.add_argument("--prompt-data", default="")
    p.add_argument("--label", default="", help="a name for this set of runs in the output")
    p.add_argument("--out", default="")
    p.add_argument("extra", nargs="*", help="more train.py flags (after --)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="slipstream-startup-") as tmp:
        work = Path(tmp)
        model, prompts = a.hf_checkpoint, a.prompt_data
        if not model:
            sys.path.insert(0, str(ROOT / "tests"))
            from mesh_fixtures import build_prompts, build_tiny_model

            model, prompts = str(build_tiny_model(work / "model")), str(build_prompts(work / "train.jsonl"))
        runs = []
        for i in range(a.repeats):
            run_dir = work / f"run{i}"
            argv = [
                sys.executable, str(ROOT / "train.py"), "--hf-checkpoint", model, "--prompt-data", prompts,
                "--run-dir", str(run_dir), "--num-rollout", str(a.num_rollout),
                "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--rollout-max-response-len", "4",
                "--global-batch-size", "8", "--micro-batch-size", "8", "--rollout-num-servers", "2",
                *a.extra,
            ]  # fmt: skip
            runs.append(one_run(argv, run_dir, a.num_rollout))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "timeline"}), flush=True)
    load = os.getloadavg()
    result = {
        "label": a.label,
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    keys = ("first_step_s", "last_step_to_services_down_s", "last_step_to_launcher_exit_s")
    for key in (*keys, "timeline_first_step_s", "timeline_last_step_to_all_stopped_s"):
        values = sorted(r[key] for r in runs if r.get(key) is not None)
        if values:
            result[key + "_median"] = values[len(values) // 2]
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    if a.out:
        out = Path(a.out)
        old = json.loads(out.read_text()) if out.exists() else []
        out.write_text(json.dumps([*old, result], indent=1) + "\n")


if __name__ == "__main__":
    main()
