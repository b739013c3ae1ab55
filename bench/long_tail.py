"""Issue 3's long-tail measurement: trained tokens/s with partial rollout + over-sampling against drain.

    .venv/bin/python bench/long_tail.py [--num-rollout 12] [--out bench/results/long_tail.json]

The workload: a tiny random-init Qwen3 (the test fixture's shape, the demo's character
tokenizer, 512 positions). At random init the next-token distribution is close to uniform over
the ~20-token vocabulary, so EOS ends a response with probability ~1/20 per token and lengths
are roughly geometric: most responses short, a few run to --rollout-max-response-len (256).
`--eos-scale` multiplies the EOS row of the (untied) LM head, pushing the EOS logit of every
context further from zero -- a spread of per-context stop rates, i.e. a mixture of geometrics
with a heavier tail. The reward (the demo's math rule) is ~0 everywhere, so GRPO advantages are
0 and the weights barely move: this is a throughput measurement, not a learning one, and the
length distribution stays the one measured up front (by sampling from the checkpoint in-process
at the runs' temperature).

Both runs go through the same script, one after another, same flags except the mode:

    drain    (default) a weight update lets in-flight requests finish on the old weights
    partial  --partial-rollout --pause-generation-mode abort --over-sampling-batch-size M:
             M groups are dispatched per step, the first rollout-batch-size to finish fill the
             batch, the stragglers are aborted and continued next round (tokens kept)

"Trained tokens/s" = sum of `num_trained_tokens` over steps 2..N / (`elapsed_s` of step N -
`elapsed_s` of step 1): the first step carries process start-up and is left out of both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from slipstream.demo.task import write_prompts  # noqa: E402
from slipstream.demo.tokenizer import build_char_tokenizer  # noqa: E402
from slipstream.models.hf import init_model, load_model, save_model  # noqa: E402
from slipstream.models.qwen3 import Qwen3Config  # noqa: E402


def build_workload(out: Path, eos_scale: float, seed: int) -> tuple[Path, Path]:
    """The random-init model (EOS row of the LM head scaled by `eos_scale`) and its prompt file."""
    model_dir = out / "model"
    tok = build_char_tokenizer(model_dir)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,  # so scaling the EOS output row leaves its input embedding alone
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = init_model(config, seed=seed)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= eos_scale
    save_model(model, model_dir)
    return model_dir, write_prompts(out / "train.jsonl", 2048, seed)


@torch.no_grad()
def sample_lengths(model_dir: Path, prompts: Path, n: int, max_len: int, temperature: float) -> list[int]:
    """Response lengths (EOS included, as the engine counts them) of `n` sampled responses."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_model(model_dir).eval()
    eos = model.config.eos_token_ids
    records = [json.loads(line) for line in prompts.read_text().splitlines()][:n]
    g = torch.Generator().manual_seed(0)
    lengths = []
    for i in range(0, len(records), 128):
        batch = [tok(r["prompt"])["input_ids"] for r in records[i : i + 128]]
        width = max(map(len, batch))  # left-pad with a repeated first token: lengths only, not quality
        ids = torch.tensor([[b[0]] * (width - len(b)) + b for b in batch])
        done = torch.zeros(len(batch), dtype=torch.bool)
        length = torch.zeros(len(batch), dtype=torch.long)
        for _ in range(max_len):
            logits = model(ids)[:, -1] / temperature
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
            length += (~done).long()
            done |= torch.isin(nxt, torch.tensor(eos))
            ids = torch.cat([ids, nxt[:, None]], 1)
            if done.all():
                break
        lengths += length.tolist()
    return lengths


def percentiles(xs: list[int], cap: int) -> dict:
    s = sorted(xs)

    def q(p: float) -> int:
        return s[min(int(p * len(s)), len(s) - 1)]

    return {
        "n": len(s),
        "mean": round(sum(s) / len(s), 2),
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": s[-1],
        "share_at_cap": round(sum(x >= cap for x in s) / len(s), 4),
    }


def throughput(rows: list[dict]) -> dict:
    steps = [r for r in rows if "num_trained_tokens" in r]
    if len(steps) < 2:
        raise SystemExit("long_tail: fewer than 2 trainer steps in metrics.jsonl")
    tokens = sum(r["num_trained_tokens"] for r in steps[1:])
    wall = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    return {
        "num_steps": len(steps),
        "trained_tokens": tokens,
        "steps_wall_s": round(wall, 2),
        "trained_tokens_per_s": round(tokens / wall, 1),
        "response_len_mean": round(sum(r["response_len_mean"] for r in steps) / len(steps), 2),
        "staleness_max_seen": max(r.get("staleness_max", 0) for r in steps),
        "coord_counters_last": {k: v for k, v in steps[-1].items() if k.startswith("coord_")},
    }


def run_mode(name: str, flags: list[str], common: list[str], run_root: str) -> dict:
    run_dir = f"{run_root}/{name}"
    cmd = [sys.executable, "-m", "slipstream", "train", *common, "--run-dir", run_dir, *flags]
    print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = ROOT / run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.exists():
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise SystemExit(f"long_tail: run {name} failed (exit {proc.returncode}):\n{tail}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    out = {"flags": flags, "run_dir": run_dir, "process_wall_s": round(time.monotonic() - t0, 1)}
    out.update(throughput(rows))
    print(f"[{name}] {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-rollout", type=int, default=12)
    parser.add_argument("--rollout-batch-size", type=int, default=16)
    parser.add_argument("--n-samples-per-prompt", type=int, default=4)
    parser.add_argument("--over-sampling-batch-size", type=int, default=24)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--eos-scale", type=float, default=1.0)
    parser.add_argument("--max-staleness", type=int, default=1, help="the default of slipstream train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-root", default="runs/bench-longtail")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long_tail.json")
    args = parser.parse_args()

    work = ROOT / args.run_root / "workload"
    model_dir, prompts = build_workload(work, args.eos_scale, args.seed)
    lengths = percentiles(sample_lengths(model_dir, prompts, 256, args.max_len, 1.0), args.max_len)
    print(f"[workload] response lengths {lengths}", file=sys.stderr, flush=True)

    common = [
        "--hf-checkpoint", str(model_dir), "--prompt-data", str(prompts),
        "--rollout-batch-size", str(args.rollout_batch_size),
        "--n-samples-per-prompt", str(args.n_samples_per_prompt),
        "--num-rollout", str(args.num_rollout),
        "--rollout-max-response-len", str(args.max_len),
        "--rollout-temperature", "1.0",
        "--rollout-num-servers", "2",
        "--global-batch-size", str(args.rollout_batch_size * args.n_samples_per_prompt),
        "--micro-batch-size", "32",
        "--lr", "1e-4",
        "--max-staleness", str(args.max_staleness),
        # Recycled partials span versions: train them (TIS-corrected) rather than drop them, both modes.
        "--use-tis", "--stale-sample-policy", "correct",
        "--rm-type", "math",
        "--seed", str(args.seed),
    ]  # fmt: skip
    modes = {
        "drain": [],
        "partial": [
            "--partial-rollout", "--pause-generation-mode", "abort",
            "--over-sampling-batch-size", str(args.over_sampling_batch_size),
        ],
    }  # fmt: skip
    runs = {name: run_mode(name, flags, common, args.run_root) for name, flags in modes.items()}
    ratio = runs["partial"]["trained_tokens_per_s"] / runs["drain"]["trained_tokens_per_s"]
    result = {
        "bench": "long_tail",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch CPU",
        "command": "bench/long_tail.py " + " ".join(sys.argv[1:]),
        "workload": {
            "model": "random-init tiny Qwen3 (hidden 32, 2 layers), demo char tokenizer, untied LM head",
            "eos_scale": args.eos_scale,
            "response_length_sampled_at_init": lengths,
            "reward": "math rule, ~0 everywhere (random model): GRPO advantages ~0, throughput only",
        },
        "common_flags": common,
        "runs": runs,
        "partial_over_drain": round(ratio, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
