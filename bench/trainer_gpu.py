"""Trainer throughput and MFU for one rollout step of a Qwen3-0.6B-shaped policy.

    python bench/trainer_gpu.py [--samples 64] [--prompt-len 128] [--response-len 256]

The real `Actor.train_rollout` (proximal log-prob recompute, GRPO-scored PPO loss, AdamW) on
random weights with synthetic samples; one optimizer step over all samples, micro-batches of 16.
MFU counts 6 x params x trained tokens per step (forward + backward) against the dense bf16
peak given by --peak-tflops (the H200's 989); the proximal log-prob forward (another 2 x
params per token) is extra work not credited, so the hardware does ~4/3 of what MFU says.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from slipstream.config import parse_config
from slipstream.models.hf import save_model
from slipstream.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from slipstream.services.trainer.actor import Actor
from slipstream.types import Sample, Status

SHAPE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)  # fmt: skip


def samples(n: int, prompt_len: int, response_len: int, vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        toks = torch.randint(0, vocab, (prompt_len + response_len,), generator=g).tolist()
        out.append(Sample(tokens=toks, response_length=response_len, status=Status.COMPLETED, reward=float(i % 2),
                          rollout_log_probs=[-1.0] * response_len, policy_versions=[0] * response_len,
                          loss_mask=[1] * response_len))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trainer_gpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model = Qwen3ForCausalLM(Qwen3Config(**SHAPE)).to(torch.bfloat16)
        save_model(model, d)
        params = sum(p.numel() for p in model.parameters())
        del model
        cfg = parse_config([
            "--hf-checkpoint", d, "--dtype", args.dtype, "--rollout-batch-size", str(args.samples // 8),
            "--n-samples-per-prompt", "8", "--micro-batch-size", "16", "--lr", "1e-6",
        ])  # fmt: skip
        actor = Actor(cfg)
        batch = samples(args.samples, args.prompt_len, args.response_len, SHAPE["vocab_size"])
        scores = [s.reward - 0.5 for s in batch]
        actor.train_rollout(batch, scores)  # warm-up
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        steps = 3
        for _ in range(steps):
            stats = actor.train_rollout(batch, scores)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        dt = (time.perf_counter() - t0) / steps
    tokens = args.samples * (args.prompt_len + args.response_len)
    mfu = 6 * params * tokens / dt / (args.peak_tflops * 1e12)
    result = {
        "bench": "trainer_gpu", "params": params, "dtype": args.dtype, "samples": args.samples,
        "tokens_per_step": tokens, "step_s": round(dt, 4), "tokens_per_s": round(tokens / dt, 1),
        "mfu": round(mfu, 4), "loss": stats.loss,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
