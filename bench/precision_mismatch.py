"""Issue 16: what each weight precision costs the train/rollout agreement and the learning, and what
each format weighs.

    .venv/bin/python bench/precision_mismatch.py [--only mismatch learn memory] [--seeds 1234 4321]
        [--mismatch-steps 20] [--learn-steps 100] [--prep runs/precision/prep] [--extra "--bf16"]
        [--out bench/results/precision_mismatch.json]

On the GPU machine: `sh scripts/gpu_env.sh run python3 bench/precision_mismatch.py --only mismatch
--extra "--bf16" --out bench/results/precision_mismatch_gpu.json` (every run is the whole mesh on
the GPU; `--extra` is appended to every run's flags).

- mismatch: the demo's mesh (`slipstream demo`: Redis, reward, coordinator, 2 rollout servers,
  trainer, each its own process) from one warm start, on-policy (`--sync`, so staleness adds
  nothing), same seed and steps, once per mode below; the figure is the trainer's
  `logprob_abs_diff_mean` (|trainer log-prob - rollout log-prob| over trained tokens, recomputed
  by the trainer with its current weights) averaged over the steps, and its largest
  `logprob_abs_diff_max`, with each mode's ratio to the bf16-sync run.
- learn: the demo as it ships (100 steps of 64 x 8, one version of staleness, TIS) per seed for
  bf16 sync, INT4 QAT and unified FP8; the figure is the demo's own held-out greedy accuracy of the
  last checkpoint (`held_out_greedy_after` in its summary.json: the fp32 masters), and the difference
  to bf16 per seed; for the QAT modes also `held_out_greedy_served`, the same checkpoint with its
  projections rounded as the rollout serves them (int4 groups / FP8 blocks).
- memory: weight bytes of Qwen3-0.6B / 8B / 30B-A3B / 235B-A22B per format, from their configs'
  numbers (written below; no hub): bf16; FP8 (every linear projection and routed expert e4m3 with
  an fp32 scale per 128x128 block of each matrix, the rest bf16); INT4 (the --int4-qat-targets
  weights as int4 with an fp32 scale per 128 inputs, the rest bf16), for targets "linear" and, on
  MoE models, "experts" (auto). The bf16 and FP8 figures are checked against the wire's own
  layout: `packer.plan`'s manifest for a meta-device model of each config (our model code, its
  experts stacked [E, out, in]) must list exactly these bytes.

`--prep` is a demo warm start (`slipstream.demo.warmstart.prepare_demo`; made there, seed 0, when
missing). The runs go one after another; JSON on stdout and in `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODES: dict[str, list[str]] = {
    "bf16-sync": ["--weight-sync-dtype", "bf16"],
    "fp8-sync": ["--weight-sync-dtype", "fp8"],  # FP8 rollout weights, full-precision training
    "unified-fp8": ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"],
    "int4": ["--weight-sync-dtype", "int4"],  # int4 rollout weights, no QAT
    "int4-qat": ["--int4-qat", "--weight-sync-dtype", "int4"],
}
LEARN_MODES = ["bf16-sync", "int4-qat", "unified-fp8"]

# Qwen3 configs (config.json on the hub): hidden, intermediate (dense MLP), layers, heads, KV heads,
# head_dim, vocab, tied embeddings, experts, MoE intermediate (0 experts: dense).
QWEN3 = {
    "Qwen3-0.6B": dict(h=1024, i=3072, layers=28, heads=16, kv=8, hd=128, vocab=151936, tied=True, e=0, mi=0),
    "Qwen3-8B": dict(h=4096, i=12288, layers=36, heads=32, kv=8, hd=128, vocab=151936, tied=False, e=0, mi=0),
    "Qwen3-30B-A3B": dict(
        h=2048, i=6144, layers=48, heads=32, kv=4, hd=128, vocab=151936, tied=False, e=128, mi=768
    ),
    "Qwen3-235B-A22B": dict(
        h=4096, i=12288, layers=94, heads=64, kv=4, hd=128, vocab=151936, tied=False, e=128, mi=1536
    ),
}


# ---- memory --------------------------------------------------------------------------------------


def _tensors(c: dict) -> list[tuple[str, tuple[int, int], int]]:
    """(kind, [out, in], count) of every weight matrix or vector; kind: attn, mlp, expert, other."""
    h, hd, layers = c["h"], c["hd"], c["layers"]
    out = [("other", (c["vocab"], h), 1 if c["tied"] else 2), ("other", (1, h), 1)]  # embed (+ head), norm
    out += [
        ("attn", (c["heads"] * hd, h), layers),  # q
        ("attn", (c["kv"] * hd, h), 2 * layers),  # k, v
        ("attn", (h, c["heads"] * hd), layers),  # o
        ("other", (1, hd), 2 * layers),  # q_norm, k_norm
        ("other", (1, h), 2 * layers),  # input / post-attention norms
    ]
    if c["e"]:
        out += [
            ("other", (c["e"], h), layers),  # router
            ("expert", (c["mi"], h), 2 * c["e"] * layers),  # gate, up per expert
            ("expert", (h, c["mi"]), c["e"] * layers),  # down per expert
        ]
    else:
        out += [("mlp", (c["i"], h), 2 * layers), ("mlp", (h, c["i"]), layers)]
    return out


def _bytes(c: dict, fmt: str) -> int:
    total = 0
    for kind, (rows, cols), count in _tensors(c):
        n = rows * cols
        linear = kind != "other"
        if fmt == "fp8" and linear:
            size = n + 4 * -(-rows // 128) * -(-cols // 128)
        elif (fmt == "int4-linear" and linear) or (fmt == "int4-experts" and kind == "expert"):
            size = n // 2 + 4 * rows * (cols // 128)
        else:
            size = 2 * n
        total += size * count
    return total


def _manifest_bytes(c: dict, fmt: str) -> int:
    """The bytes of the tensors `packer.plan` lists for a version of config `c` in format `fmt`
    (a meta-device model: nothing allocated)."""
    import torch

    from slipstream.models import ModelConfig, Qwen3ForCausalLM
    from slipstream.weights.packer import plan, weights_to_sync

    cfg = ModelConfig(
        hidden_size=c["h"], intermediate_size=c["i"], num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
        num_key_value_heads=c["kv"], head_dim=c["hd"], vocab_size=c["vocab"], tie_word_embeddings=c["tied"],
        model_type="qwen3_moe" if c["e"] else "qwen3", num_experts=c["e"], moe_intermediate_size=c["mi"] or 768,
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    manifest = plan(weights_to_sync(model.state_dict(), cfg.tie_word_embeddings), 0, fmt)[0]
    return sum(e.nbytes for e in manifest.tensors)


def memory() -> dict:
    rows = {}
    for name, c in QWEN3.items():
        params = sum(r * k * count for _, (r, k), count in _tensors(c))
        fmts = ["bf16", "fp8", "int4-linear"] + (["int4-experts"] if c["e"] else [])
        rows[name] = {"params": params, **{f: _bytes(c, f) for f in fmts}}
        for fmt in ("bf16", "fp8"):
            if rows[name][fmt] != _manifest_bytes(c, fmt):
                raise RuntimeError(f"{name} {fmt}: the arithmetic and the wire's manifest disagree")
    return rows


# ---- mesh runs -----------------------------------------------------------------------------------


def _prep(path: Path) -> Path:
    if not (path / "model" / "config.json").exists():
        from slipstream.demo.warmstart import prepare_demo

        prepare_demo(path, seed=0)
    return path


def _demo(run_dir: Path, prep: Path, flags: list[str]) -> dict:
    """One `slipstream demo` run; its metrics rows and summary."""
    argv = [
        sys.executable, "-m", "slipstream", "demo", "--run-dir", str(run_dir),
        "--hf-checkpoint", str(prep / "model"), "--prompt-data", str(prep / "train.jsonl"), *flags,
    ]  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished run directory is not started again
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 3):  # 3: the demo's own target missed, still a result
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"rows": rows, "summary": summary, "wall_s": round(time.time() - t0, 1)}


def _mismatch_of(rows: list[dict]) -> dict:
    means = [r["logprob_abs_diff_mean"] for r in rows if r.get("logprob_abs_diff_mean") is not None]
    maxes = [r["logprob_abs_diff_max"] for r in rows if r.get("logprob_abs_diff_max") is not None]
    return {
        "logprob_abs_diff_mean": statistics.fmean(means) if means else None,
        "logprob_abs_diff_max": max(maxes) if maxes else None,
        "per_step_mean": means,
    }


def served_greedy(run_dir: Path, mode: str) -> float | None:
    """Held-out greedy accuracy of the run's last checkpoint with the weights the rollout serves
    (int4- or FP8-rounded projections, as the QAT trainer computed with); None for the other modes."""
    import torch
    from transformers import AutoTokenizer

    from slipstream.demo.task import all_problems
    from slipstream.demo.warmstart import evaluate
    from slipstream.models.hf import load_model
    from slipstream.quant import fake_quantize_int4, int4_names, round_fp8_weights_

    if mode not in ("int4-qat", "unified-fp8"):
        return None
    save = run_dir / "checkpoints"
    ckpt = save / (save / "latest").read_text().strip()
    model = load_model(ckpt, dtype=torch.float32)
    if mode == "unified-fp8":
        round_fp8_weights_(model)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in int4_names(((n, p.shape) for n, p in params.items()), "auto"):
                params[name].copy_(fake_quantize_int4(params[name]))
    return evaluate(model, AutoTokenizer.from_pretrained(ckpt), all_problems("eval"))["greedy_accuracy"]


def mismatch(args, prep: Path) -> dict:
    out = {}
    for mode in args.modes:
        flags = ["--sync", "--num-rollout", str(args.mismatch_steps), "--seed", str(args.seeds[0])]
        run = _demo(args.runs / f"mismatch-{mode}", prep, [*flags, *MODES[mode], *args.extra])
        out[mode] = {"flags": MODES[mode], **_mismatch_of(run["rows"]), "wall_s": run["wall_s"]}
        print(f"mismatch {mode}: {out[mode]['logprob_abs_diff_mean']:.5f}", file=sys.stderr)
    base = out.get("bf16-sync", {}).get("logprob_abs_diff_mean")
    for r in out.values():
        r["ratio_to_bf16_sync"] = r["logprob_abs_diff_mean"] / base if base else None
    return out


def learn(args, prep: Path) -> dict:
    runs: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:
        for mode in LEARN_MODES:
            flags = ["--seed", str(seed), "--num-rollout", str(args.learn_steps), *MODES[mode], *args.extra]
            run_dir = args.runs / f"learn-{mode}-s{seed}"
            run = _demo(run_dir, prep, flags)
            s = run["summary"]
            runs.setdefault(mode, {})[seed] = {
                "held_out_greedy_before": s.get("held_out_greedy_before"),
                "held_out_greedy_after": s.get("held_out_greedy_after"),
                "held_out_greedy_served": served_greedy(run_dir, mode),
                **_mismatch_of(run["rows"]),
                "wall_s": run["wall_s"],
            }
            print(f"learn {mode} seed {seed}: {s.get('held_out_greedy_after')}", file=sys.stderr)
    out = {}
    for mode, by_seed in runs.items():
        after = {seed: r["held_out_greedy_after"] for seed, r in by_seed.items()}
        base = {seed: r["held_out_greedy_after"] for seed, r in runs.get("bf16-sync", {}).items()}
        out[mode] = {
            "flags": MODES[mode],
            "runs": by_seed,
            "held_out_greedy_after_mean": statistics.fmean(after.values()),
            "vs_bf16_per_seed": {s: round(a - base[s], 4) for s, a in after.items() if s in base},
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=["mismatch", "learn", "memory"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[1234, 4321])
    p.add_argument("--mismatch-steps", type=int, default=20)
    p.add_argument("--learn-steps", type=int, default=100)
    p.add_argument("--prep", type=Path, default=ROOT / "runs" / "precision" / "prep")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "precision")
    p.add_argument("--extra", default="", help="flags appended to every run, one string")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "precision_mismatch.json")
    args = p.parse_args()
    args.extra = args.extra.split()
    result: dict = {"host": platform.node(), "machine": platform.machine(), "extra": args.extra}
    if "memory" in args.only:
        result["memory_bytes"] = memory()
    if "mismatch" in args.only or "learn" in args.only:
        prep = _prep(args.prep)
        result["warm_start"] = json.loads((prep / "model" / "warmstart.json").read_text()).get(
            "eval_after_sft"
        )
        if "mismatch" in args.only:
            result["mismatch"] = mismatch(args, prep)
        if "learn" in args.only:
            result["learn"] = learn(args, prep)
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
