"""--true-on-policy-mode on the CPU: the sampler's log-probs against the trainer's, and what the mode costs.

    .venv/bin/python bench/true_on_policy_cpu.py --out bench/results/true_on_policy_cpu.json

A random Qwen3-shaped model of the demo's size (--hidden 128, 4 layers, 64-token vocabulary; fp32).
For each concurrency (requests decoded together, --concurrency), the engine in the mode generates
until --tokens of its own sampled tokens are in hand (response lengths spread over 1x-2x
--response-len so rows leave and join mid-flight); the trainer (Actor, same mode) computes the
log-probs of every one of them, and the bench reports max |trainer - sampler| (the mode promises
exactly 0.0) with the token count. Cost: engine tokens/s and the trainer's training step
(forward+backward+AdamW on 64 of the samples), mode on against off, interleaved in one run
(--repeats each); the JSON carries every timing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from slipstream.config import config_from_values
from slipstream.models.config import ModelConfig
from slipstream.models.hf import init_model, load_model, save_model
from slipstream.services.rollout.engine.native import NativeEngine
from slipstream.services.rollout.engine.request import Request
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.batch import collate
from slipstream.types import Sample, Status


def generate(model_dir: Path, mode: bool, concurrency: int, length: int, tokens: int, seed: int):
    """(samples, decode seconds) until `tokens` sampled tokens, `concurrency` requests at a time."""
    engine = NativeEngine(
        load_model(model_dir), eos_token_ids=[], max_batch_size=concurrency, true_on_policy=mode
    )
    samples, seconds, n = [], 0.0, 0
    gen = torch.Generator().manual_seed(seed)
    while n < tokens:
        prompts = [torch.randint(3, 60, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(concurrency)]  # fmt: skip
        reqs = [Request(f"{n}-{i}", p, length + (i * length) // concurrency, seed=seed + n + i)
                for i, p in enumerate(prompts)]  # fmt: skip
        t = time.perf_counter()
        results = engine.generate(reqs)
        seconds += time.perf_counter() - t
        for req, res in zip(reqs, results, strict=True):
            samples.append(Sample(
                tokens=req.tokens + res.tokens, response_length=len(res.tokens), reward=0.0,
                status=Status.COMPLETED, rollout_log_probs=res.log_probs, policy_versions=res.versions,
            ))  # fmt: skip
            n += len(res.tokens)
    return samples, seconds


def mismatch(actor: Actor, samples: list[Sample]) -> tuple[float, int]:
    worst, n = 0.0, 0
    for i in range(0, len(samples), 64):
        part = samples[i : i + 64]
        with torch.no_grad():
            lp = actor.log_probs(collate(part, [0.0] * len(part)))
        for row, s in enumerate(part):
            start = len(s.tokens) - s.response_length - 1
            diff = lp[row, start : start + s.response_length] - torch.tensor(s.rollout_log_probs)
            worst, n = max(worst, float(diff.abs().max())), n + s.response_length
    return worst, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--tokens", type=int, default=25_000, help="sampled tokens per concurrency")
    parser.add_argument("--response-len", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(
        vocab_size=64, hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        max_position_embeddings=4 * args.response_len + 16, tie_word_embeddings=True,
    )  # fmt: skip
    model_dir = Path(tempfile.mkdtemp()) / "model"
    save_model(init_model(cfg, seed=0), model_dir)
    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=8, n_samples_per_prompt=8, micro_batch_size=16,
        device="cpu", rollout_max_response_len=2 * args.response_len,
    )  # fmt: skip
    actors = {mode: Actor.from_config(config_from_values({**values, "true_on_policy_mode": mode}))
              for mode in (True, False)}  # fmt: skip
    result: dict = {"model": f"Qwen3 shape, hidden {args.hidden}, 4 layers, vocab 64, fp32",
                    "threads": args.threads, "mismatch": [], "engine": [], "train_step": []}  # fmt: skip
    for c in args.concurrency:
        samples, seconds = generate(model_dir, True, c, args.response_len, args.tokens, seed=c)
        worst, n = mismatch(actors[True], samples)
        row = {"concurrency": c, "tokens": n, "max_abs_diff": worst}
        print(json.dumps(row), flush=True)
        result["mismatch"].append(row)
        for r in range(args.repeats):  # cost: tokens/s with the mode on and off, interleaved
            for mode in (True, False):
                samples, seconds = generate(
                    model_dir, mode, c, args.response_len, min(args.tokens, 8 * c * args.response_len), seed=r
                )
                n = sum(s.response_length for s in samples)
                result["engine"].append(
                    {"concurrency": c, "mode": mode, "repeat": r, "tokens_per_s": n / seconds}
                )
                print(json.dumps(result["engine"][-1]), flush=True)
    batch = samples[:64]
    for r in range(args.repeats):
        for mode, actor in actors.items():
            t = time.perf_counter()
            actor.train_rollout(batch, [1.0, -1.0] * (len(batch) // 2))
            result["train_step"].append({"mode": mode, "repeat": r, "seconds": time.perf_counter() - t})
            print(json.dumps(result["train_step"][-1]), flush=True)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    result["cost"] = {
        "engine_tokens_per_s_ratio": {
            c: median([e["tokens_per_s"] for e in result["engine"] if e["concurrency"] == c and e["mode"]])
            / median([e["tokens_per_s"] for e in result["engine"] if e["concurrency"] == c and not e["mode"]])
            for c in args.concurrency
        },
        "train_step_time_ratio": median([s["seconds"] for s in result["train_step"] if s["mode"]])
        / median([s["seconds"] for s in result["train_step"] if not s["mode"]]),
    }
    print(json.dumps(result["cost"]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
