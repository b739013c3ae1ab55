"""Issue 14: time and steps to a held-out greedy-accuracy target, our mesh next to TRL's GRPOTrainer.

    .venv/bin/python bench/learn_vs_trl.py [--only NAME ...] [--seeds 1 2] [--target 0.75]
        [--rollout-batch-size 64] [--n-samples-per-prompt 8] [--lr 3e-4] [--num-steps 120]
        [--eval-every 10] [--device cpu|cuda] [--prep runs/learn/prep] [--out bench/results/learn_vs_trl.json]
        [--parallel N --cpus-per-run 2 --first-cpu 2]   # N runs at once, each on its own 2 cores
    sh scripts/gpu_env.sh run python3 bench/learn_vs_trl.py --preset h200 --device cuda --out $OUT/learn_h200.json
    /work/venv-trl/bin/python bench/learn_vs_trl.py --preset h200 --smoke --out /tmp/smoke.json  # CPU, end to end

One saved warm start (`--prep`, made once by `slipstream.demo.warmstart.prepare_demo`, the
demo's own: a tiny Qwen3-shaped model SFT'd on 2-digit addition until its greedy accuracy is
low, ~0.44 on held-out problems, seed 0) is trained by each variant below, one run at a time on this
machine, with the same batch (prompts x samples), learning rate, AdamW settings, sampling
(temperature 1, top-p 1, no top-k, `--max-len` new tokens), rule reward (the reward
service's `math_reward`) and seed list. Every `--eval-every` optimizer steps each side
writes a Hugging Face checkpoint; after the run, the same code (`warmstart.evaluate`: exact
greedy accuracy by one teacher-forced forward, every answer token and EOS the argmax) scores
every checkpoint on all held-out problems (never trained on). The first checkpoint whose
greedy accuracy reaches `--target` gives the steps and the time to target.

Two clocks per step: `train_s`, training time with checkpoint writes taken out, and `wall_s`,
seconds since the bench launched the run (process start-up and saves included). TRL's training
begins at `on_train_begin` (its model loaded; `on_step_end` times, minus the saves the callback
times). The mesh's begins when it can train: the trainer's clock (`elapsed_s`) or, when the
trainer started first, the first rollout server's ready (its engine warmed up, graphs captured,
as TRL's model is loaded before `on_train_begin`); minus the save gaps the trainer's rows show.
What the trainer waited before that is kept as `start_wait_s`.

Variants (`--only`; mesh ones are `slipstream train` with the flags shown on top of the
shared ones, all real processes: Redis, reward, coordinator, 2 rollout servers, trainer):

    trl                TRL GRPOTrainer, its defaults where they are the algorithm (loss_type dapo =
                       token mean over the step, scale_rewards group, beta 0, epsilon 0.2, one
                       optimizer step per generation); matched: lr (constant), AdamW betas, clip 1,
                       fp32 (no bf16 autocast), no gradient checkpointing
    mesh               our defaults (whatever config.py says now)
    trl+bf16           the same with TRL's bf16 mixed precision (bf16=True, its default where the GPU has bf16)
    old-defaults       the defaults before issue 14 (--max-staleness 1, fp8 wire, no TIS, micro-batch 8)
    and the one-factor-at-a-time ablations in VARIANTS below.

Presets (`--preset`; a flag given on the command line still wins):

    h200               issue 14 item 5, one H200 in one call of ~9 minutes: a 25 M-parameter Qwen3 shape
                       (hidden 512, 8 layers, 8 heads of 64, 4 KV heads, MLP 1536; char tokenizer, tied
                       embeddings) SFT'd ON THE GPU by the demo's own `prepare_demo` (the trainer's SFT, stopped
                       at greedy 0.42 on the check problems), then RL at 256 prompts x 8 samples, lr 1e-4, up to
                       300 steps, a checkpoint every 10, greedy target 0.75, seeds 1 then 2 (2 in what 1 left); each side's whole optimizer step in
                       one pass (ours: --micro-batch-size = the step, the GPU's auto would be passes of 8), fp32
                       training on both sides (TRL bf16=False; our rollout engine samples from the bf16 weights
                       the colocated push serves, TIS on: our defaults). The mesh runs with its defaults on one
                       GPU: colocated (CUDA IPC pushes), one version stale, rollout overlapping training. The
                       checkpoints are scored on the GPU while each run goes (`--stop-at-target`): a run stops at
                       its first checkpoint at the target, or after `--max-run-s` 170 s, or sooner when
                       the runs left would not fit in `--budget-s` 480 s from the bench's start.
    --smoke            the same path shrunk to seconds on a CPU (a 2-layer 64-wide model, 10 SFT steps,
                       4 prompts x 4 samples, 4 steps, target 0: stops at the first checkpoint).

Output: one JSON with every run's curve and a summary per variant (median over seeds), written
after the warm start and after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One factor at a time against the mesh's defaults (flags appended to the shared ones). The
# names say what they pin; "old-" rows restate the defaults before issue 14.
VARIANTS: dict[str, list[str]] = {
    "mesh": [],
    # The defaults before issue 14: staleness 1, FP8 wire, no TIS, micro-batches of 8.
    "old-defaults": ["--max-staleness", "1", "--weight-sync-dtype", "fp8", "--no-use-tis", "--micro-batch-size", "8"],
    "old+sync": ["--sync", "--weight-sync-dtype", "fp8", "--no-use-tis", "--micro-batch-size", "8"],
    "old+bf16": ["--max-staleness", "1", "--weight-sync-dtype", "bf16", "--no-use-tis", "--micro-batch-size", "8"],
    "old+tis": ["--max-staleness", "1", "--weight-sync-dtype", "fp8", "--use-tis", "--micro-batch-size", "8"],
    "sync+bf16": ["--sync", "--weight-sync-dtype", "bf16", "--no-use-tis", "--micro-batch-size", "8"],
    "sync+bf16+tis": ["--sync", "--weight-sync-dtype", "bf16", "--use-tis", "--micro-batch-size", "8"],
    "stale1+bf16+tis": ["--max-staleness", "1", "--weight-sync-dtype", "bf16", "--use-tis", "--micro-batch-size", "8"],
    "stale2+bf16+tis": ["--max-staleness", "2", "--weight-sync-dtype", "bf16", "--use-tis", "--micro-batch-size", "8"],
    "sync+bf16+seqmean": [
        "--sync", "--weight-sync-dtype", "bf16", "--no-use-tis", "--micro-batch-size", "8",
        "--loss-agg-mode", "seq-mean-token-mean",
    ],
    "sync+bf16+nostd": [
        "--sync", "--weight-sync-dtype", "bf16", "--no-use-tis", "--micro-batch-size", "8",
        "--disable-grpo-std-normalization",
    ],
    # The new defaults one factor back: micro-batches of 8 (steps the same, time not), no TIS, FP8.
    "mesh+micro8": ["--micro-batch-size", "8"],
    "mesh-tis": ["--no-use-tis"],
    "mesh+fp8": ["--weight-sync-dtype", "fp8"],
    "mesh+sync": ["--sync"],
    # Processes and threads on a 2-core box (bench/cpu_per_process.py says where the CPU goes).
    "mesh+1server": ["--rollout-num-servers", "1"],
    "mesh+2servers": ["--rollout-num-servers", "2"],
    "mesh+threads1": ["--torch-threads", "1"],  # the trainer's default before it took every core
    "mesh+threads2": ["--torch-threads", "2"],
    "mesh+1server+threads2": ["--rollout-num-servers", "1", "--torch-threads", "2"],
    # One GPU (issue 14 item 5): more of the rollout's per-sample host work in parallel, and a
    # server that decodes a whole step's samples at once (TRL generates them in one batch).
    "mesh+4servers": ["--rollout-num-servers", "4"],
    "mesh+batch2048": ["--rollout-max-batch-size", "2048"],
    "mesh+4servers+batch512": ["--rollout-num-servers", "4", "--rollout-max-batch-size", "512"],
    "mesh+4servers+bf16": ["--rollout-num-servers", "4", "--bf16"],
    "mesh+4servers+batch512+bf16": ["--rollout-num-servers", "4", "--rollout-max-batch-size", "512", "--bf16"],
    # Since session 11 the launcher itself puts 4 servers on a shared GPU for a model under 100M
    # parameters (placement.shared_gpu_servers): "mesh" is then what "mesh+4servers" was.
    "mesh+bf16": ["--bf16"],
    # The trainer and the four servers as clients of one CUDA MPS server: kernels side by side
    # instead of the GPU time-slicing between five processes (mps.py).
    "mesh+bf16+mps": ["--bf16", "--cuda-mps"],
    # Two versions stale: the rollout of a step may take two of the trainer's steps (the H200's
    # rollout cycle, admit -> generate -> score -> store, ran longer than one 0.13 s step).
    "mesh+bf16+stale2": ["--bf16", "--max-staleness", "2"],
}  # fmt: skip

# TRL's rows: GRPOConfig settings on top of the matched ones (`trl_child`), as "key=value".
TRL_VARIANTS: dict[str, list[str]] = {
    "trl": [],
    "trl+bf16": ["bf16=true"],  # TRL's own mixed precision (its default where the GPU has bf16)
}

RUN_MARGIN_S = 20.0  # --budget-s: a stopped run's shutdown and last scoring
KILL_AFTER_S = 90.0  # a run still going this long after the bench stopped it is killed
MIN_RUN_S = 60.0  # --budget-s: a later seed's run gets at least this or is skipped

# Issue 14 item 5 on one H200: bench settings and warm start. Not tuned on a GPU: the demo's lrs
# (SFT 6e-3, RL 3e-4 at 256 wide x 2 layers) over 1/width (muP's Adam rule, as GPT-3's lrs fall
# with width) gives 3e-3 and 1.5e-4 at 512; SFT 2e-3 and RL 1e-4 leave room for 4x the depth (RL at
# 1e-4 took both sides from 0.45 to 0.75 in 50-60 steps on the H200). Batch 4x the CPU's.
PRESETS: dict[str, dict] = {
    "h200": {
        "args": dict(
            rollout_batch_size=256, n_samples_per_prompt=8, lr=1e-4, num_steps=300, eval_every=10,
            target=0.75, seeds=[1, 2], stop_at_target=True, max_run_s=170.0, budget_s=480.0, copy_logs=True,
        ),
        "warm_start": dict(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, lr=2e-3, warmup_steps=50, batch_size=256,
            micro_batch_size=256, sft_steps=2000, num_train_prompts=16384,
        ),
    },
}  # fmt: skip
SMOKE = {  # --smoke: the preset's path in seconds on a CPU
    "args": dict(
        rollout_batch_size=4, n_samples_per_prompt=4, num_steps=4, eval_every=2, target=0.0,
        max_run_s=0.0, budget_s=0.0,
    ),
    "warm_start": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, batch_size=32, micro_batch_size=32, sft_steps=10,
        warmup_steps=2, stop_greedy_accuracy=2.0, num_check=64, num_eval=64, num_train_prompts=256,
    ),
}  # fmt: skip


# ---- shared ---------------------------------------------------------------------------------


def _eval_problems():
    from slipstream.demo.task import all_problems

    return all_problems("eval")


def evaluate_checkpoint(path: Path, device: str = "cpu") -> float:
    """Greedy held-out accuracy of the Hugging Face checkpoint at `path` (either side's)."""
    import torch
    from transformers import AutoTokenizer

    from slipstream.demo.warmstart import evaluate
    from slipstream.models.hf import load_model

    model = load_model(str(path), device=torch.device(device), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path))
    with torch.no_grad():
        return evaluate(model, tok, _eval_problems())["greedy_accuracy"]


def prepare(prep: Path, seed: int, warm_start: dict | None = None, device: str = "cpu") -> dict:
    """The shared warm start (the demo's own preparation, `warm_start` overriding its
    WarmStartConfig, the SFT on `device`), once."""
    from slipstream.demo.warmstart import WarmStartConfig, prepare_demo

    if not (prep / "model" / "config.json").exists():
        prepare_demo(prep, seed=seed, cfg=WarmStartConfig(**(warm_start or {})), device=device)
    return json.loads((prep / "model" / "warmstart.json").read_text())


class LiveEval:
    """Greedy accuracy of a run's checkpoints (`step_NNNNNN`, written whole under a temporary
    name) in `ckpt_dir`, each scored once; `stop` says whether the run should end now: at its
    first checkpoint at the target (--stop-at-target, checkpoints scored while it runs) or past
    --max-run-s since `t_launch`. bench/cpu_per_process.py passes its own namespace, without
    these two settings: never stop."""

    def __init__(self, args, ckpt_dir: Path, t_launch: float) -> None:
        self.args, self.dir, self.t_launch = args, ckpt_dir, t_launch
        self.at_target = getattr(args, "stop_at_target", False)
        self.max_run_s = getattr(args, "max_run_s", 0.0)
        self.greedy: dict[int, float] = {}
        self.stopped: str | None = None  # why the bench stopped the run: "target" or "time"
        self.t_stop = 0.0

    def score_new(self) -> None:
        for d in sorted(self.dir.glob("step_*")) if self.dir.is_dir() else []:
            step = int(d.name.removeprefix("step_"))
            if step not in self.greedy:
                self.greedy[step] = evaluate_checkpoint(d, self.args.device)

    def stop(self) -> bool:
        if self.stopped is None and self.at_target:
            self.score_new()
            if any(g >= self.args.target for g in self.greedy.values()):
                self.stopped = "target"
        if self.stopped is None and self.max_run_s and time.time() - self.t_launch > self.max_run_s:
            self.stopped = "time"
        if self.stopped is not None:
            self.t_stop = time.time()
        return self.stopped is not None

    def kill_if_stuck(self, proc: subprocess.Popen) -> None:
        """SIGKILL a run that has not ended KILL_AFTER_S after the bench stopped it (a step that hangs)."""
        if self.stopped is not None and time.time() - self.t_stop > KILL_AFTER_S and proc.poll() is None:
            proc.kill()

    def greedy_at(self, step: int) -> float | None:
        self.score_new()
        return self.greedy.get(step)


_SLOTS = threading.local()


def _pin_prefix(args) -> list[str]:
    """`taskset -c <this worker's cores>` under --cpus-per-run, so parallel runs each get a 2-core box."""
    if not args.cpus_per_run:
        return []
    slot = getattr(_SLOTS, "slot", 0)
    first = args.first_cpu + slot * args.cpus_per_run
    cpus = ",".join(str(c) for c in range(first, first + args.cpus_per_run))
    # Python's own sched_setaffinity, then exec: no dependency on util-linux's taskset.
    pin = "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); os.execvp(sys.argv[2], sys.argv[2:])"
    return [sys.executable, "-c", pin, cpus]


def copy_logs(args, name: str, seed: int) -> None:
    """The run's logs (the bench's log of it; a mesh's services' logs), each its last 256 KiB, next
    to --out in <out>_logs/: what comes back from a GPU machine is --out's folder, not runs/."""
    run_dir = args.runs_dir / f"{name}-s{seed}"
    safe = name.replace("+", "_")  # the device tool brings back no path with a "+" in it
    dest = args.out.parent / f"{args.out.stem}_logs" / f"{safe}-s{seed}"
    dest.mkdir(parents=True, exist_ok=True)
    for log in [args.runs_dir / f"{name}-s{seed}.log", *sorted((run_dir / "logs").glob("*.log"))]:
        if log.is_file():
            with log.open("rb") as f:
                f.seek(max(0, log.stat().st_size - 256 * 1024))
                (dest / log.name).write_bytes(f.read())


def _gpu_name(device: str) -> str | None:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None


def _first_at(curve: list[dict], target: float) -> dict | None:
    return next((p for p in curve if p["greedy"] is not None and p["greedy"] >= target), None)


# ---- our mesh -------------------------------------------------------------------------------


def mesh_argv(args, extra: list[str], seed: int, run_dir: Path) -> list[str]:
    """`python -m slipstream train` with the shared settings, then --mesh-flags, then `extra`."""
    flags = [
        "--hf-checkpoint", str(args.prep / "model"), "--prompt-data", str(args.prep / "train.jsonl"),
        "--run-dir", str(run_dir), "--rollout-batch-size", str(args.rollout_batch_size),
        "--n-samples-per-prompt", str(args.n_samples_per_prompt), "--num-rollout", str(args.num_steps),
        "--rollout-max-response-len", str(args.max_len), "--rollout-temperature", "1.0",
        "--lr", str(args.lr), "--adam-beta1", "0.9", "--adam-beta2", str(args.adam_beta2),
        "--clip-grad", "1.0", "--rm-type", "math", "--seed", str(seed),
        "--save-interval", str(args.eval_every), "--device", args.device,
        "--rollout-shuffle",
    ]  # fmt: skip
    return [sys.executable, "-m", "slipstream", "train", *flags, *args.mesh_flags, *extra]


def run_mesh(args, name: str, extra: list[str], seed: int, run_dir: Path) -> dict:
    argv = mesh_argv(args, extra, seed, run_dir)
    pin = _pin_prefix(args)
    t_launch = time.time()
    metrics = run_dir / "metrics.jsonl"
    seen: dict[int, float] = {}  # step -> wall seconds since launch when its row appeared
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([*pin, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    live = LiveEval(args, run_dir / "checkpoints", t_launch)
    offset = 0
    while True:
        done = proc.poll() is not None
        if metrics.exists():
            with metrics.open() as f:
                f.seek(offset)
                data = f.read()
            complete = data[: data.rfind("\n") + 1]
            offset += len(complete)
            for line in complete.splitlines():
                if line.strip():
                    seen.setdefault(json.loads(line)["step"], time.time() - t_launch)
        if done:
            break
        # After the rows are stamped: scoring a checkpoint takes a moment.
        if live.stopped is None and live.stop():
            proc.send_signal(signal.SIGTERM)  # the launcher's orderly stop: last step, checkpoint, exit 143
        live.kill_if_stuck(proc)
        time.sleep(0.05)
    log.close()
    # Stopped by the bench: the launcher's exit code for SIGTERM, or the signal's own when it came
    # after the launcher had put its handlers back (the run was ending anyway).
    if proc.returncode not in ((0, 128 + signal.SIGTERM, -signal.SIGTERM) if live.stopped else (0,)):
        tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(
            f"{name} seed {seed}: slipstream train exited {proc.returncode}; see {log.name}; its last lines:\n"
            + "\n".join(tail)
        )
    # (No metrics: stopped before its first step.)
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    # Checkpoint writes sit between a save step's row and the next step's start: the gap over a
    # step's own duration (num_trained_tokens / tokens_per_s) beyond the median gap is the save.
    durations = [r["num_trained_tokens"] / max(r["tokens_per_s"], 1e-9) for r in rows]
    gaps = [rows[i]["elapsed_s"] - rows[i - 1]["elapsed_s"] - durations[i] for i in range(1, len(rows))]
    base = statistics.median(gaps) if gaps else 0.0
    saved, start_wait = 0.0, _start_wait(run_dir, rows)
    curve = []
    for i, r in enumerate(rows):
        if i and rows[i - 1]["step"] % args.eval_every == 0:
            saved += max(0.0, gaps[i - 1] - base)
        point = {
            "step": r["step"],
            "train_s": round(r["elapsed_s"] - start_wait - saved, 3),
            "wall_s": round(seen.get(r["step"], float("nan")), 3),
            "sampled_accuracy": r["accuracy"],
            "step_s": round(durations[i], 4),
            "compute_s": r.get("compute_s"),
            "wait_data_s": r.get("wait_data_s"),
            "push_weights_s": r.get("push_weights_s"),
            "commit_s": r.get("commit_s"),
            "logprob_abs_diff_mean": r.get("logprob_abs_diff_mean"),
            "ppo_kl": r.get("ppo_kl"),
            "pg_clipfrac": r.get("pg_clipfrac"),
            "tis_mean": r.get("tis_mean"),
            "staleness_mean": r.get("staleness_mean"),
            "greedy": None,
        }
        point["greedy"] = live.greedy_at(r["step"])
        curve.append(point)
    placement = [x for x in Path(log.name).read_text().splitlines() if "placement:" in x]
    return {
        "side": "mesh", "argv": argv[2:], "curve": curve, "checkpoint_s": round(saved, 3),
        "start_wait_s": round(start_wait, 3),
        "stopped": live.stopped, "placement": placement[-1] if placement else None,
        **_start_up(run_dir),
    }  # fmt: skip


# What a run's first steps waited for, kept in the JSON (a GPU call brings back few files, so the
# logs themselves often stay behind): the launcher's timeline (each service's ready, the first
# step) and the rollout servers' warm-up and first weights versions, with their log times.
_START_UP_LINES = re.compile(
    r"decode graphs captured|now serving weights version [1-3] |attached to coordinator|after the warm-up"
)


def _start_wait(run_dir: Path, rows: list[dict]) -> float:
    """Seconds the trainer's clock ran before the first rollout server was ready (0 when it
    started later, or when the timeline or the rows' `unix_s` are missing)."""
    timeline = run_dir / "timeline.json"
    if not rows or "unix_s" not in rows[0] or not timeline.exists():
        return 0.0
    t = json.loads(timeline.read_text())
    ready = [e["s"] for e in t["events"] if re.fullmatch(r"rollout-\d+ ready", e["event"])]
    if not ready:
        return 0.0
    trainer_start = rows[0]["unix_s"] - rows[0]["elapsed_s"]
    return max(0.0, t["launched_at_epoch"] + min(ready) - trainer_start)


def _start_up(run_dir: Path) -> dict:
    timeline = run_dir / "timeline.json"
    events = json.loads(timeline.read_text())["events"] if timeline.exists() else []
    lines = []
    for path in sorted((run_dir / "logs").glob("rollout-*.log")):
        lines += [x for x in path.read_text(errors="replace").splitlines() if _START_UP_LINES.search(x)]
    return {"timeline": events, "rollout_start_up": lines}


# ---- TRL ------------------------------------------------------------------------------------


def run_trl(args, name: str, extra: list[str], seed: int, run_dir: Path) -> dict:
    """TRL in its own process (its own torch threads and imports), as the mesh's services are."""
    spec = {
        "prep": str(args.prep), "out": str(run_dir), "seed": seed, "device": args.device,
        "rollout_batch_size": args.rollout_batch_size, "n": args.n_samples_per_prompt,
        "lr": args.lr, "adam_beta2": args.adam_beta2, "max_len": args.max_len, "steps": args.num_steps,
        "eval_every": args.eval_every, "micro": args.trl_micro_batch_size, "threads": args.trl_threads or args.cpus_per_run,
        "extra": extra,
    }  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    t_launch = time.time()
    live = LiveEval(args, run_dir / "checkpoints", t_launch)
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(
            [*_pin_prefix(args), sys.executable, __file__, "--trl-child", str(run_dir / "spec.json")],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        while proc.poll() is None:
            if live.stopped is None and live.stop():
                (run_dir / "stop").touch()  # the child's callback ends training after its step
            live.kill_if_stuck(proc)
            time.sleep(0.05)
    code = proc.returncode
    if code != 0:
        raise RuntimeError(
            f"{name} seed {seed}: TRL exited {code}; see {run_dir.parent / f'{run_dir.name}.log'}"
        )
    steps = json.loads((run_dir / "steps.json").read_text())
    curve = []
    for s in steps["steps"]:
        curve.append(
            {
                "step": s["step"],
                "train_s": s["train_s"],
                "wall_s": round(s["time"] - t_launch, 3),
                "sampled_accuracy": s.get("reward"),
                "step_s": s["step_s"],
                "cpu_s": s.get("cpu_s"),  # the TRL process's user+sys seconds so far
                "greedy": live.greedy_at(s["step"]),
            }
        )
    return {
        "side": "trl",
        "settings": steps["settings"],
        "curve": curve,
        "checkpoint_s": steps["checkpoint_s"],
        "stopped": live.stopped,
    }


def trl_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from slipstream.services.reward.rules import math_reward

    prep, out = Path(spec["prep"]), Path(spec["out"])
    records = [json.loads(x) for x in (prep / "train.jsonl").read_text().splitlines() if x.strip()]
    data = Dataset.from_list([{"prompt": r["prompt"], "label": r["label"]} for r in records])

    def reward(completions, label, **_):
        return [math_reward(c, y) for c, y in zip(completions, label, strict=True)]

    samples = spec["rollout_batch_size"] * spec["n"]
    micro = spec["micro"] or samples
    cpu = spec["device"] == "cpu"
    settings = dict(
        output_dir=str(out / "trl"), seed=spec["seed"], data_seed=spec["seed"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=spec["adam_beta2"], weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=micro, gradient_accumulation_steps=samples // micro,
        num_generations=spec["n"], max_completion_length=spec["max_len"],
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
        max_steps=spec["steps"], save_strategy="no", report_to=[], logging_steps=1,
        bf16=False, gradient_checkpointing=False, use_cpu=cpu, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    for kv in spec["extra"]:  # e.g. "loss_type=grpo"
        k, v = kv.split("=", 1)
        settings[k] = json.loads(v) if v[:1] in "0123456789-[{tfn" and v not in ("nan",) else v
    config = GRPOConfig(**settings)
    model = AutoModelForCausalLM.from_pretrained(str(prep / "model"), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(prep / "model"))
    steps: list[dict] = []
    clock = {"start": 0.0, "saved": 0.0, "last": 0.0}
    rewards: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):  # noqa: ARG002
            clock["start"] = clock["last"] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):  # noqa: ARG002
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

        def on_step_end(self, a, state, control, model=None, **kw):  # noqa: ARG002
            now = time.perf_counter()
            cpu = os.times()
            row = {
                "step": state.global_step, "time": time.time(), "cpu_s": round(cpu.user + cpu.system, 3),
                "train_s": round(now - clock["start"] - clock["saved"], 3),
                "step_s": round(now - clock["last"], 4),
            }  # fmt: skip
            if state.global_step % spec["eval_every"] == 0:
                name = f"step_{state.global_step:06d}"
                tmp = out / "checkpoints" / f".{name}.tmp"  # whole before the bench sees it
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                tmp.rename(out / "checkpoints" / name)
                clock["saved"] += time.perf_counter() - now
            if (out / "stop").exists():  # the bench's stop: target reached or time up
                control.should_training_stop = True
            steps.append(row)
            clock["last"] = time.perf_counter()

    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok,
        callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    for row, r in zip(steps, rewards, strict=False):  # logging_steps=1: one log per step
        row["reward"] = r
    keep = {
        k: getattr(config, k)
        for k in (
            "loss_type", "scale_rewards", "beta", "epsilon", "epsilon_high", "num_iterations",
            "importance_sampling_level", "per_device_train_batch_size", "gradient_accumulation_steps",
            "steps_per_generation", "generation_batch_size", "num_generations", "max_completion_length",
            "temperature", "top_p", "top_k", "learning_rate", "lr_scheduler_type", "adam_beta1", "adam_beta2",
            "max_grad_norm", "bf16", "gradient_checkpointing",
        )
    }  # fmt: skip
    keep["torch_threads"] = torch.get_num_threads()
    import trl

    keep["trl_version"] = trl.__version__
    (out / "steps.json").write_text(
        json.dumps({"settings": keep, "steps": steps, "checkpoint_s": round(clock["saved"], 3)}, default=str)
    )


# ---- driver ---------------------------------------------------------------------------------


def summarize(runs: list[dict], target: float) -> dict:
    hits = [_first_at(r["curve"], target) for r in runs]
    steps = [h["step"] for h in hits if h]
    times = [h["train_s"] for h in hits if h]
    walls = [h["wall_s"] for h in hits if h]
    per_step = [statistics.median(p["step_s"] for p in r["curve"][1:]) for r in runs if len(r["curve"]) > 1]
    return {
        "seeds": [r["seed"] for r in runs],
        "reached": f"{len(steps)}/{len(runs)}",
        "steps_to_target": [h["step"] if h else None for h in hits],
        "train_s_to_target": [h["train_s"] if h else None for h in hits],
        "wall_s_to_target": [h["wall_s"] if h else None for h in hits],
        "median_steps_to_target": statistics.median(steps) if len(steps) == len(runs) else None,
        "median_train_s_to_target": statistics.median(times) if len(times) == len(runs) else None,
        "median_wall_s_to_target": statistics.median(walls) if len(walls) == len(runs) else None,
        "median_step_s": statistics.median(per_step) if per_step else None,
        "final_greedy": [next((p["greedy"] for p in reversed(r["curve"]) if p["greedy"] is not None), None) for r in runs],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only",
        nargs="*",
        default=["trl", "mesh"],
        help=f"Variants: {', '.join([*TRL_VARIANTS, *VARIANTS])}.",
    )
    p.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    p.add_argument("--target", type=float, default=0.75, help="Greedy held-out accuracy to reach.")
    p.add_argument("--rollout-batch-size", type=int, default=64)
    p.add_argument("--n-samples-per-prompt", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4, help="1e-3 (the issue's) collapses both sides.")
    p.add_argument("--adam-beta2", type=float, default=0.98, help="Both sides (the mesh's default).")
    p.add_argument("--max-len", type=int, default=8, help="Most new tokens per sample.")
    p.add_argument("--num-steps", type=int, default=120, help="Optimizer steps (= rollout steps) per run.")
    p.add_argument("--eval-every", type=int, default=10, help="Steps between checkpoints that are evaluated.")
    p.add_argument(
        "--device", default="cpu",
        help="cpu or cuda: every mesh process, TRL, the checkpoints' scoring and a --preset's SFT.",
    )  # fmt: skip
    p.add_argument("--preset", choices=sorted(PRESETS), help="Settings and warm start of a machine (above).")
    p.add_argument("--smoke", action="store_true", help="The --preset's path shrunk to seconds on a CPU.")
    p.add_argument(
        "--stop-at-target", action=argparse.BooleanOptionalAction, default=False,
        help="Score checkpoints while a run goes (on --device) and stop it at its first one at --target.",
    )  # fmt: skip
    p.add_argument(
        "--max-run-s", type=float, default=0.0, help="Stop a run this long after its launch; 0 = never."
    )
    p.add_argument(
        "--budget-s", type=float, default=0.0,
        help="Seconds from the bench's start (warm start included) that every run must fit in: each run "
        "is stopped by --max-run-s or an equal share of what is left, whichever is sooner; 0 = no budget.",
    )  # fmt: skip
    p.add_argument(
        "--prep", type=Path, help="The warm start's directory (default: runs/learn/prep[-PRESET])."
    )
    p.add_argument("--prep-seed", type=int, default=0, help="Seed of the warm start (made once).")
    p.add_argument("--runs-dir", type=Path, help="Where the runs go (default: runs/learn[-PRESET]).")
    p.add_argument("--trl-micro-batch-size", type=int, default=0, help="0 = the whole step in one pass.")
    p.add_argument("--trl-threads", type=int, default=0, help="TRL's torch threads; 0 = torch's default.")
    p.add_argument("--trl-args", nargs="*", default=[], help="GRPOConfig overrides key=value for trl runs.")
    p.add_argument(
        "--mesh-flags", nargs=argparse.REMAINDER, default=[], help="Flags for every mesh run (last)."
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "learn_vs_trl.json")
    p.add_argument(
        "--copy-logs", action=argparse.BooleanOptionalAction, default=False,
        help="Copy each run's logs next to --out (<out>_logs/; the h200 preset does).",
    )  # fmt: skip
    p.add_argument("--parallel", type=int, default=1, help="Runs at once (steps compare, clocks do not).")
    p.add_argument(
        "--cpus-per-run", type=int, default=0,
        help="Pin each run (every process of it) to its own N cores with taskset: N=2 makes each of "
        "--parallel runs a 2-core box on a bigger machine. 0 = no pinning.",
    )  # fmt: skip
    p.add_argument("--first-cpu", type=int, default=0, help="First core of the first slot (--cpus-per-run).")
    p.add_argument("--trl-child", help=argparse.SUPPRESS)
    t_bench = time.time()
    args = p.parse_args(argv)
    if args.trl_child:
        trl_child(args.trl_child)
        return 0
    bad = [n for n in args.only if n not in TRL_VARIANTS and n not in VARIANTS]
    if bad:
        p.error(f"--only {bad[0]}: not a variant ({', '.join([*TRL_VARIANTS, *VARIANTS])})")
    if args.smoke and not args.preset:
        p.error("--smoke shrinks a --preset: give one")
    warm_start: dict = {}
    if args.preset:  # its settings become the defaults: flags given on the command line still win
        preset = PRESETS[args.preset]
        warm_start = {**preset["warm_start"], **(SMOKE["warm_start"] if args.smoke else {})}
        p.set_defaults(**{**preset["args"], **(SMOKE["args"] if args.smoke else {})})
        args = p.parse_args(argv)
        # Each side's whole optimizer step in one pass, as TRL's (--trl-micro-batch-size 0) is.
        step = str(args.rollout_batch_size * args.n_samples_per_prompt)
        args.mesh_flags = ["--micro-batch-size", step, *args.mesh_flags]
    tag = f"-{args.preset}{'-smoke' if args.smoke else ''}" if args.preset else ""
    args.prep = args.prep or ROOT / "runs" / "learn" / f"prep{tag}"
    args.runs_dir = args.runs_dir or ROOT / "runs" / f"learn{tag}"

    if args.cpus_per_run:  # the bench itself (evaluation) keeps off the runs' cores
        import torch

        if args.first_cpu:  # cores below --first-cpu are the bench's own (at most the first two)
            os.sched_setaffinity(0, set(range(min(2, args.first_cpu))))
        torch.set_num_threads(max(1, min(2, args.first_cpu or 1)))
    warm = prepare(args.prep, args.prep_seed, warm_start, args.device)
    start_greedy = evaluate_checkpoint(args.prep / "model", args.device)
    print(
        f"warm start: {warm['num_parameters'] / 1e6:.1f} M parameters, {warm['sft_steps']} SFT steps in "
        f"{warm['sft_seconds']:.1f} s, held-out greedy {start_greedy:.3f}",
        flush=True,
    )
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if results.get("warm_start", {}).get("greedy") not in (None, start_greedy):
        results = {}  # another warm start: start over
    results.update(
        {
            "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "gpu": _gpu_name(args.device),
            },
            "warm_start": {"greedy": start_greedy, "prep": str(args.prep), **warm},
            "target": args.target,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "trl_child")},
        }
    )
    results.setdefault("runs", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The warm start, even if no run ends.
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")

    free = list(range(max(1, args.parallel)))
    lock = threading.Lock()

    def one(name: str, seed: int) -> dict | None:
        with lock:
            _SLOTS.slot = free.pop(0)
        try:
            return _one(name, seed)
        finally:
            with lock:
                free.append(_SLOTS.slot)

    def _one(name: str, seed: int) -> dict | None:
        run_args = args
        if args.budget_s:
            # What is left of the budget, shared equally by the runs still to go: the first seed's
            # share it among themselves; a later seed runs only in what they left.
            first = [j for j in jobs if j[1] == args.seeds[0]]
            to_go = [j for j in jobs if j not in done and j not in failed and j not in skipped]
            if (name, seed) in first:
                to_go = [j for j in to_go if j in first]
            cap = (args.budget_s - (time.time() - t_bench)) / len(to_go) - RUN_MARGIN_S
            if (name, seed) not in first and (cap < MIN_RUN_S or any(j[1] == seed for j in skipped)):
                return None  # a seed runs whole or not at all: a side without the other compares nothing
            cap = max(cap, MIN_RUN_S)  # a run cut to nothing measures nothing
            run_args = argparse.Namespace(**{**vars(args), "max_run_s": min(args.max_run_s or cap, cap)})
        run_dir = args.runs_dir / f"{name}-s{seed}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        load = os.getloadavg()
        t0 = time.time()
        if name in TRL_VARIANTS:
            r = run_trl(run_args, name, [*TRL_VARIANTS[name], *args.trl_args], seed, run_dir)
        else:
            r = run_mesh(run_args, name, VARIANTS[name], seed, run_dir)
        r.update(
            seed=seed, load_before=load, load_after=os.getloadavg(), run_s=round(time.time() - t0, 1),
            parallel=args.parallel, cpus=(_pin_prefix(args) or [None] * 4)[3], max_run_s=run_args.max_run_s,
        )  # fmt: skip
        hit = _first_at(r["curve"], args.target)
        last = next((p for p in reversed(r["curve"]) if p["greedy"] is not None), None)
        step_s = statistics.median(p["step_s"] for p in r["curve"][1:]) if len(r["curve"]) > 1 else None
        print(
            f"{name} seed {seed}: "
            + (
                f"greedy {args.target} at step {hit['step']}, train {hit['train_s']:.1f} s, "
                f"wall {hit['wall_s']:.1f} s after launch"
                if hit
                else "target missed"
            )
            + (f"; last scored greedy {last['greedy']:.3f} at step {last['step']}" if last else "")
            + (f"; median step {step_s:.3f} s" if step_s is not None else "")
            + f"; {len(r['curve'])} steps in {r['run_s']} s"
            + (f", stopped by the bench ({r['stopped']})" if r.get("stopped") else "")
            + f"; load {load[0]:.1f}->{r['load_after'][0]:.1f}",
            flush=True,
        )
        return r

    # Seed by seed, both sides in turn: a run cut short by a time limit costs one side of one seed.
    jobs = [(name, seed) for seed in args.seeds for name in args.only]
    done: dict[tuple[str, int], dict] = {}

    failed: dict[tuple[str, int], str] = {}
    skipped: set[tuple[str, int]] = set()

    def record(job: tuple[str, int]) -> None:
        try:
            r = one(*job)
            if r is None:
                print(
                    f"{job[0]} seed {job[1]}: skipped, too little of --budget-s left for its seed", flush=True
                )
                with lock:
                    skipped.add(job)
                    results.setdefault("skipped", []).append(f"{job[0]}-s{job[1]}")
                    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
                return
            if args.copy_logs:
                copy_logs(args, *job)
        except Exception as e:  # noqa: BLE001 - one run's failure must not cost the others their turn
            import traceback

            traceback.print_exc()
            print(f"{job[0]} seed {job[1]}: failed: {e}", flush=True)
            if args.copy_logs:
                copy_logs(args, *job)
            with lock:
                failed[job] = str(e)
                results["failed"] = {f"{n}-s{s}": why for (n, s), why in failed.items()}
                args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
            return
        with lock:  # write as runs finish: a run cut short by a time limit loses only itself
            done[job] = r
            name = job[0]
            runs = [done[(n, s)] for n, s in jobs if n == name and (n, s) in done]
            results["runs"][name] = {"runs": runs, "summary": summarize(runs, args.target)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")

    from concurrent.futures import ThreadPoolExecutor

    # --parallel > 1 shares the machine between runs: their steps are comparable, their clocks are
    # only where each run has cores of its own (--cpus-per-run).
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        for f in [pool.submit(record, j) for j in jobs]:
            f.result()
    for name, v in results["runs"].items():
        s = v["summary"]
        print(
            f"{name:22s} steps {s['steps_to_target']}  train_s {s['train_s_to_target']}  step_s {s['median_step_s']}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
