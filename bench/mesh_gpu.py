"""The whole mesh on one GPU against its parts in one process, same model, batch and tokens.

    sh scripts/gpu_env.sh run python3 bench/mesh_gpu.py --out bench/results/mesh_gpu.json
    python3 bench/mesh_gpu.py --variants default no-colocate --steps 6 [--compile]

Issue 13 items 7 and 8 and issue 20 items 3 and 5: with every service on one GPU the launcher
chooses colocation (weights over CUDA IPC) and the mesh should run at the speed of its parts; the
first step should come within ~15 s of launch plus model load and compile, and everything should
be down within 3 s of the last step.

One Qwen3-0.6B-shaped checkpoint (random init, bf16, the full 151,936-token vocabulary) with a
word-level tokenizer over that vocabulary (`t17 t4093 ...` is exactly those ids), random
128-token prompts, 32 prompts x 8 samples x 256 new tokens, lr 1e-6, the rule reward of
bench/grpo_step_gpu.py (the share of even token ids, `bench/mesh_gpu_reward.py`).

- parts: `grpo_step_gpu.bench_ours` on the same checkpoint: generate, reward, train, weight
  update, one after another in one process (synchronous by construction).
- each mesh variant: `train.py` with the same sizes; the step time is the median gap between
  consecutive metrics.jsonl rows after the first two (warm-up, and the first version's push), and
  the launcher's timeline.json gives the start-up (first step) and shutdown (last step -> all
  stopped) figures. `default`: no placement flags (the launcher resolves colocation on one GPU),
  one version of staleness; `default-sync`: the same with --sync (the parts' schedule);
  `no-colocate`: weights over the gRPC byte path, as before issue 13.
- `sync-*` (issue 16, not in the default list): one server, --sync, and one weight precision each
  (bf16 / FP8 sync, unified FP8, either with --rollout-fp8, int4 without and with QAT); the figure
  is the trainer's `logprob_abs_diff_mean` per step:
  `--variants sync-bf16 sync-fp8 sync-unified-fp8 sync-fp8-rollout-fp8 sync-unified-fp8-rollout-fp8
  sync-int4 sync-int4-qat --skip-parts`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = {
    "default": [],
    "default-sync": ["--sync"],
    "no-colocate": ["--no-colocate"],
    "one-server": ["--rollout-num-servers", "1"],
    "one-server-sync": ["--rollout-num-servers", "1", "--sync"],
    "one-server-fp8": ["--rollout-num-servers", "1", "--weight-sync-dtype", "fp8"],
    # Issue 16: the train/rollout log-prob mismatch per weight precision, on-policy (one server,
    # --sync: staleness adds nothing), read from logprob_abs_diff_mean.
    **{
        f"sync-{name}": ["--rollout-num-servers", "1", "--sync", *flags]
        for name, flags in {
            "bf16": ["--weight-sync-dtype", "bf16"],
            "fp8": ["--weight-sync-dtype", "fp8"],
            "unified-fp8": ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"],
            "fp8-rollout-fp8": ["--weight-sync-dtype", "fp8", "--rollout-fp8"],
            "unified-fp8-rollout-fp8": ["--fp8-format", "e4m3", "--rollout-fp8"],
            "int4": ["--weight-sync-dtype", "int4"],
            "int4-qat": ["--int4-qat", "--weight-sync-dtype", "int4"],
        }.items()
    },
}


def build_checkpoint(out: Path, vocab_ids: int) -> None:
    import torch
    from engine_gpu import qwen3_06b, random_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from slipstream.models.hf import save_model

    config = qwen3_06b()
    save_model(random_model(config), out)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token=f"t{config.eos_token_id}")
    fast.save_pretrained(out)
    torch.cuda.empty_cache()


def write_prompts(path: Path, n: int, length: int, vocab: int) -> None:
    rng = random.Random(7)
    with path.open("w") as f:
        for _ in range(n):
            f.write(
                json.dumps({"prompt": " ".join(f"t{rng.randrange(vocab)}" for _ in range(length))}) + "\n"
            )


def mesh_run(name: str, flags: list[str], a, model: Path, prompts: Path, work: Path) -> dict:
    run_dir = work / name
    argv = [
        sys.executable, str(ROOT / "train.py"), "--hf-checkpoint", str(model), "--prompt-data", str(prompts),
        "--run-dir", str(run_dir), "--run-id", f"mesh-gpu-{name}", "--num-rollout", str(a.steps),
        "--rollout-batch-size", str(a.prompts), "--n-samples-per-prompt", str(a.n),
        "--global-batch-size", str(a.prompts * a.n), "--rollout-max-batch-size", str(a.prompts * a.n),
        "--rollout-max-prompt-len", str(a.prompt_len + 8), "--rollout-max-response-len", str(a.new_tokens),
        "--rollout-temperature", "1.0", "--lr", "1e-6", "--dtype", "bfloat16", "--bf16",
        "--use-dynamic-batch-size", "--max-tokens-per-gpu", str(a.max_tokens_per_gpu),
        "--custom-rm-path", f"{ROOT / 'bench' / 'mesh_gpu_reward.py'}:even_share",
        *(["--torch-compile"] if a.compile else []), *flags,
    ]  # fmt: skip
    t0 = time.monotonic()
    timeout = a.timeout if a.deadline is None else min(a.timeout, a.deadline - t0)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, timed_out = proc.communicate(timeout=max(timeout, 1.0))[0], False
    except subprocess.TimeoutExpired:
        # The launcher stops its services in order on SIGTERM (and they die with it on SIGKILL):
        # the steps it logged so far still give a step time, and the next run gets a free GPU.
        proc.terminate()
        try:
            output = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
        timed_out = True
    wall = time.monotonic() - t0
    metrics = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if metrics.exists()
        else []
    )
    if (proc.returncode != 0 and not timed_out) or len(rows) < 2:
        return {
            "variant": name,
            "error": f"timed out after {timeout:.0f} s" if timed_out else f"exit {proc.returncode}",
            "steps_logged": len(rows),
            "tail": output[-3000:],
        }
    gaps = [b["elapsed_s"] - a_["elapsed_s"] for a_, b in zip(rows, rows[1:], strict=False)]
    steady = gaps[1:] or gaps  # the first gap carries the first version's push and compile
    timeline_file = run_dir / "timeline.json"
    timeline = json.loads(timeline_file.read_text()) if timeline_file.exists() else {}
    trainer_log = run_dir / "logs" / "trainer.log"
    saves = [
        line.split("trainer")[-1].strip()
        for line in (trainer_log.read_text().splitlines() if trainer_log.exists() else [])
        if "checkpoint step" in line
    ]
    placement = next((line for line in output.splitlines() if "placement:" in line), "")
    out = {
        "variant": name,
        **({"error": f"timed out after {timeout:.0f} s; the steps logged before it"} if timed_out else {}),
        "flags": flags,
        "placement": placement.strip(),
        "step_s_median": round(statistics.median(steady), 3),
        "step_gaps_s": [round(g, 3) for g in gaps],
        "staleness_mean": [r.get("staleness_mean") for r in rows],
        "logprob_abs_diff_mean": [r.get("logprob_abs_diff_mean") for r in rows],
        "push_weights_s": [r.get("push_weights_s") for r in rows],
        "wait_data_s": [r.get("wait_data_s") for r in rows],
        "first_step_s": timeline.get("first_step_s"),
        "last_step_to_all_stopped_s": timeline.get("last_step_to_all_stopped_s"),
        "checkpoint_saves": saves,
        "timeline": timeline,
        "launcher_wall_s": round(wall, 2),
    }
    print(name, json.dumps({k: v for k, v in out.items() if k != "timeline"}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--variants", nargs="+", default=["default", "default-sync", "no-colocate"], choices=list(VARIANTS)
    )
    p.add_argument("--steps", type=int, default=6, help="trainer steps per mesh run")
    p.add_argument("--parts-steps", type=int, default=3)
    p.add_argument("--skip-parts", action="store_true")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--max-tokens-per-gpu", type=int, default=16384)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--timeout", type=float, default=400, help="seconds per mesh run")
    p.add_argument(
        "--budget-s", type=float, default=None,
        help="seconds for the whole script: a mesh run past it is stopped (its logged steps kept)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mesh_gpu.json")
    a = p.parse_args()
    a.deadline = None if a.budget_s is None else time.monotonic() + a.budget_s
    import torch

    result: dict = {"bench": "mesh_gpu", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "config": {k: str(v) for k, v in vars(a).items() if k not in ("out", "deadline")},
                    "mesh": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mesh-gpu-") as tmp:
        work = Path(tmp)
        model, prompts = work / "model", work / "prompts.jsonl"
        t0 = time.monotonic()
        build_checkpoint(model, 151936)
        write_prompts(prompts, a.prompts * (a.steps + 4), a.prompt_len, 151936)
        result["checkpoint_build_s"] = round(time.monotonic() - t0, 1)
        if not a.skip_parts:
            from grpo_step_gpu import bench_ours

            parts_args = argparse.Namespace(**{**vars(a), "steps": a.parts_steps})
            parts = bench_ours(parts_args, str(model))
            result["parts"] = parts
            result["parts_step_s"] = parts["median_step"]["total_s"]
            print("parts", json.dumps(parts["median_step"]), flush=True)
            torch.cuda.empty_cache()
        for name in a.variants:
            result["mesh"].append(mesh_run(name, VARIANTS[name], a, model, prompts, work))
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=1) + "\n")
    if "parts_step_s" in result:
        for m in result["mesh"]:
            if "step_s_median" in m:
                m["mesh_speed_vs_parts"] = round(result["parts_step_s"] / m["step_s_median"], 3)
    summary = {m["variant"]: {k: m.get(k) for k in ("step_s_median", "mesh_speed_vs_parts", "first_step_s",
               "last_step_to_all_stopped_s", "error")} for m in result["mesh"]}  # fmt: skip
    result["summary"] = summary
    print("summary", json.dumps({"parts_step_s": result.get("parts_step_s"), **summary}), flush=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    os.sync()


if __name__ == "__main__":
    main()
