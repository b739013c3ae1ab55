"""Engine throughput on the CPU: our native engine next to `transformers` `generate`, same weights.

    .venv/bin/python bench/engine_cpu.py [--batch-sizes 1 16 64] [--new-tokens 32] [--threads 2]

Both generate exactly `--new-tokens` tokens per sequence by sampling at temperature 1 (EOS is
ignored on both sides so the work is identical), from the same random weights in the demo
model's shape, loaded from one Hugging Face directory. Writes bench/results/engine_cpu.json.
Absolute CPU numbers only compare the two engines on this machine; GPU figures live in
docs/benchmarks.md under their own commands.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def build_model(out: Path) -> Path:
    from slipstream.demo.tokenizer import build_char_tokenizer
    from slipstream.demo.warmstart import WarmStartConfig, model_config
    from slipstream.models.hf import init_model, save_model

    tok = build_char_tokenizer(out)
    config = model_config(WarmStartConfig(), tok)
    config.max_position_embeddings = 512
    save_model(init_model(config, seed=0), out)
    return out


def prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 8, (batch,), generator=g)
    return [torch.randint(0, vocab - 3, (int(n),), generator=g).tolist() for n in lengths]


def bench_ours(path: Path, batch: int, new_tokens: int, repeats: int) -> float:
    from slipstream.models.hf import load_model
    from slipstream.services.rollout.engine import NativeEngine, Request

    model = load_model(path)
    engine = NativeEngine(model, eos_token_ids=[], max_batch_size=max(batch, 1))
    best = float("inf")
    for r in range(repeats + 1):  # the first run warms up
        reqs = [
            Request(rid=f"{r}-{i}", tokens=p, max_new_tokens=new_tokens, temperature=1.0, seed=i)
            for i, p in enumerate(prompts(batch, model.config.vocab_size, r))
        ]
        t0 = time.perf_counter()
        out = engine.generate(reqs)
        dt = time.perf_counter() - t0
        assert all(len(o.tokens) == new_tokens for o in out)
        if r:
            best = min(best, dt)
    return batch * new_tokens / best


def bench_hf(path: Path, batch: int, new_tokens: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    best = float("inf")
    for r in range(repeats + 1):
        ps = prompts(batch, model.config.vocab_size, r)
        width = max(len(p) for p in ps)
        pad = model.config.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps])  # left padding for generate
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad,
            )
        dt = time.perf_counter() - t0
        assert out.shape[1] - width == new_tokens
        if r:
            best = min(best, dt)
    return batch * new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = build_model(Path(d) / "model")
        for b in args.batch_sizes:
            ours = bench_ours(path, b, args.new_tokens, args.repeats)
            hf = bench_hf(path, b, args.new_tokens, args.repeats)
            rows.append(
                {
                    "batch": b,
                    "ours_tok_s": round(ours, 1),
                    "transformers_tok_s": round(hf, 1),
                    "ratio": round(ours / hf, 2),
                }
            )
            print(f"batch {b:4d}: ours {ours:9.1f} tok/s   transformers {hf:9.1f} tok/s   x{ours / hf:.2f}")
    result = {
        "bench": "engine_cpu",
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
