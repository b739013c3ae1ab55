"""Trainer throughput and MFU for one rollout step of a Qwen3-0.6B-shaped policy, padded and packed.

    python bench/trainer_gpu.py [--samples 64] [--prompt-len 128] [--response-len 256]
                                [--max-tokens-per-gpu 16384] [--variants ...] [--out ...]

The real `Actor.train_rollout` (proximal log-prob recompute, GRPO-scored PPO loss, AdamW) on
random weights with synthetic samples; one optimizer step over all samples. Variants, in one run:

- `padded-bf16params`: bf16 parameters (no fp32 masters), micro-batches of 16;
- `padded`: `--bf16` as it ran before (fp32 parameters under bf16 autocast; with
  `--torch-compile` only the norms and MLPs compiled), micro-batches of 16;
- `packed`: the same with `--use-dynamic-batch-size --max-tokens-per-gpu N`;
- `packed-compile`: the same plus `--torch-compile`;
- `*-bf16w`: `--bf16` as it runs now: bf16 compute weights refreshed once per optimizer step
  from the fp32 masters (`services/trainer/precision.py`), no autocast; with `--torch-compile`
  each decoder layer is two compiled graphs around the attention call (`compiled_layers.py`);
- `*-mix`: responses uniform in [32, --response-len] instead of all --response-len (a realistic
  length mix: padding is then most of a padded batch's work);
- `packed-bf16w-unified-fp8`, `packed-bf16w-int4-qat` (issue 16; not in the default list): `--bf16`
  packed with `--fp8-format e4m3` / `--int4-qat`: the projections compute with their FP8-block or
  int4-group rounding (`services/trainer/quantized.py`), one quantize/dequantize per optimizer step.

`--shape 8b-slice` (the quantized and `-bf16w` variants only): Qwen3-8B's layer shape (hidden 4096,
MLP 12288, 32 heads / 8 KV heads, untied 151936 vocabulary) with 4 layers, where the GEMMs dominate.

The "before" variants (`padded`, `packed`, `packed-compile` and their `-mix`) are the trainer as
it was at a pinned commit, `--baseline-commit` (default 5a1d23f, the last one whose actor kept
that path as `Actor(baseline=True)`; `services/trainer/` no longer carries it). The bench checks
that commit out in a temporary `git worktree`, runs its own copy of this file there (same
arguments, those variants only; the `slipstream` package, services and buffer are mounted from
the worktree) and puts the rows beside this tree's, in one table.

`--profile VARIANT ...` adds a `torch.profiler` trace of one step of that variant: GPU kernel time by
kind (GEMM, attention, elementwise/norm glue, log-softmax/entropy, optimizer, copies), the GPU's
busy fraction of the step's wall time (low = launch- or host-bound) and the top kernels.

MFU: model FLOPs over wall time against the dense bf16 peak (--peak-tflops, the H200's 989).
`mfu` counts 6 x params x tokens (the usual convention, every token through every parameter; an
untied input embedding, a lookup, is not counted);
`mfu_needed` counts what a step must compute, 6 x (params - LM head) x tokens + 6 x LM head x
response tokens (no log-prob of a prompt position is ever read), and is the fair figure when
packing runs the head on response positions only. Attention score FLOPs and the proximal
log-prob forward (another 2 x params per token) are not credited in either.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from slipstream.config import parse_config
from slipstream.models.hf import save_model
from slipstream.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from slipstream.services.trainer.actor import Actor
from slipstream.types import Sample, Status

SHAPES = {
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "8b-slice": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=4,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}  # fmt: skip
SHAPE = SHAPES["0.6b"]
REPO = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "5a1d23f"  # the last trainer with the autocast / piecewise-compile path
BEFORE = ("padded", "packed", "padded-mix", "packed-mix", "packed-compile", "packed-compile-mix")
VARIANTS = (
    "padded-bf16params",
    "padded",
    "packed",
    "padded-mix",
    "packed-mix",
    "packed-compile",
    "packed-compile-mix",
    "packed-bf16w",
    "packed-compile-bf16w",
    "packed-compile-bf16w-mix",
    "packed-bf16w-unified-fp8",
    "packed-bf16w-int4-qat",
)
QUANTIZED = ("packed-bf16w-unified-fp8", "packed-bf16w-int4-qat")


def samples(n: int, prompt_len: int, response_len: int, vocab: int, mix: bool) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        r = int(torch.randint(32, response_len + 1, (1,), generator=g)) if mix else response_len
        toks = torch.randint(0, vocab, (prompt_len + r,), generator=g).tolist()
        out.append(Sample(tokens=toks, response_length=r, status=Status.COMPLETED, reward=float(i % 2),
                          rollout_log_probs=[-1.0] * r, policy_versions=[0] * r, loss_mask=[1] * r))  # fmt: skip
    return out


def flags(variant: str, args) -> list[str]:
    out = ["--dtype", "bfloat16"]
    if variant != "padded-bf16params":
        out.append("--bf16")
    if variant.startswith("packed"):
        out += ["--use-dynamic-batch-size", "--max-tokens-per-gpu", str(args.max_tokens_per_gpu)]
    if "compile" in variant:
        out.append("--torch-compile")
    if variant.endswith("unified-fp8"):
        out += ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]
    if variant.endswith("int4-qat"):
        out.append("--int4-qat")
    if args.gradient_checkpointing:
        out.append("--gradient-checkpointing")
    return out


KINDS = (  # first match wins; lower-case substrings of kernel names
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("log_softmax_entropy", ("softmax", "logsumexp", "log_softmax")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy_cast", ("copy", "memcpy", "memset", "cast", "to_copy")),
    ("reduce", ("reduce",)),
    ("elementwise_glue", ("elementwise", "vectorized", "triton", "unrolled", "fused")),
)


def profile_step(actor: Actor, batch: list[Sample], scores: list[float]) -> dict:
    """Kernel time by kind for one `train_rollout`, and how busy the GPU was."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        actor.train_rollout(batch, scores)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels: dict[str, float] = {}
    launches = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time / 1e6
            launches += 1
    by_kind: dict[str, float] = {}
    for name, t in kernels.items():
        low = name.lower()
        kind = next((k for k, keys in KINDS if any(x in low for x in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + t
    busy = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:20]
    return {
        "wall_s": round(wall, 4), "gpu_kernel_s": round(busy, 4), "gpu_busy_frac": round(busy / wall, 3),
        "kernel_launches": launches,
        "by_kind_s": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "s": round(t, 4)} for n, t in top],
    }  # fmt: skip


def run_variant(variant: str, model_dir: str, args, params: int, head: int) -> dict:
    cfg = parse_config([
        "--hf-checkpoint", model_dir, "--rollout-batch-size", str(args.samples // 8),
        "--n-samples-per-prompt", "8", "--micro-batch-size", "16", "--lr", "1e-6", *flags(variant, args),
    ])  # fmt: skip
    actor = Actor.from_config(cfg)
    batch = samples(
        args.samples, args.prompt_len, args.response_len, SHAPE["vocab_size"], variant.endswith("-mix")
    )
    scores = [s.reward - 0.5 for s in batch]
    t0 = time.perf_counter()
    actor.train_rollout(batch, scores)  # warm-up (and compilation)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        stats = actor.train_rollout(batch, scores)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    tokens = sum(len(s.tokens) for s in batch)
    response = sum(s.response_length for s in batch)
    peak = args.peak_tflops * 1e12
    members, _ = actor.micro_batches(batch)
    profiled = profile_step(actor, batch, scores) if variant in (args.profile or ()) else None
    del actor
    torch.cuda.empty_cache()
    return {
        "variant": variant, "flags": flags(variant, args), "step_s": round(dt, 4), "steps_s": [round(t, 4) for t in times],
        "warmup_s": round(warmup_s, 2), "tokens_per_step": tokens, "response_tokens": response,
        "tokens_per_s": round(tokens / dt, 1), "micro_batches": len(members),
        "mfu": round(6 * params * tokens / dt / peak, 4),
        "mfu_needed": round((6 * (params - head) * tokens + 6 * head * response) / dt / peak, 4),
        "loss": stats.loss, "grad_norm": stats.grad_norm, "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1),
        **({"profile": profiled} if profiled else {}),
    }  # fmt: skip


# Runs a bench file of another checkout with `slipstream` (and its services and buffer, which the
# editable install maps from elsewhere) imported from that checkout: argv = [root, script, args...].
_MOUNT = """
import importlib.util, runpy, sys
root, script = sys.argv[1], sys.argv[2]
for name, path in (("slipstream", "src/slipstream"), ("slipstream.services", "services"),
                   ("slipstream.buffer", "buffer")):
    spec = importlib.util.spec_from_file_location(
        name, f"{root}/{path}/__init__.py", submodule_search_locations=[f"{root}/{path}"])
    sys.modules[name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def run_before(variants: list[str], args, argv: list[str]) -> list[dict]:
    """`variants` as the bench at --baseline-commit measures them, in a worktree of that commit."""
    with tempfile.TemporaryDirectory() as tmp:
        tree, out = Path(tmp) / "before", Path(tmp) / "before.json"
        git = ["git", "-C", str(REPO)]
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), args.baseline_commit], check=True)
        try:
            profile = [v for v in args.profile or () if v in variants]
            cmd = [sys.executable, "-c", _MOUNT, str(tree), "bench/trainer_gpu.py", *argv,
                   "--variants", *variants, "--out", str(out), *(["--profile", *profile] if profile else [])]  # fmt: skip
            subprocess.run(cmd, cwd=tree, check=True)
            rows = json.loads(out.read_text())["variants"]
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)
    return [{**r, "commit": args.baseline_commit} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=16384)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--variants", nargs="+", default=[v for v in VARIANTS if v not in QUANTIZED], choices=VARIANTS
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="0.6b")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument(
        "--profile", nargs="+", choices=VARIANTS, help="also profile one step of these variants"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trainer_gpu.json")
    parser.add_argument(
        "--baseline-commit", default=BASELINE_COMMIT, help="the commit the before variants run at"
    )
    args = parser.parse_args()
    before = [v for v in args.variants if v in BEFORE]
    if before and args.shape != "0.6b":
        parser.error(
            f"--shape {args.shape}: the before variants ({', '.join(before)}) run the 0.6b shape only"
        )
    shared = ["--samples", str(args.samples), "--prompt-len", str(args.prompt_len),
              "--response-len", str(args.response_len), "--max-tokens-per-gpu", str(args.max_tokens_per_gpu),
              "--steps", str(args.steps), "--peak-tflops", str(args.peak_tflops),
              *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]  # fmt: skip
    old = {r["variant"]: r for r in run_before(before, args, shared)} if before else {}
    results = []
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(**SHAPES[args.shape])).to(torch.bfloat16)
        save_model(model, d)
        # A matmul's parameters: an untied input embedding is a lookup and computes nothing (a tied
        # one is the LM head, counted once). The 8B slice's untied embedding is 31% of its parameters.
        params = sum(p.numel() for p in model.parameters())
        if not model.config.tie_word_embeddings:
            params -= model.model.embed_tokens.weight.numel()
        head = model.lm_head.weight.numel()
        del model
        for v in args.variants:
            try:
                r = old[v] if v in old else run_variant(v, d, args, params, head)
            except Exception as e:  # one broken variant must not cost the others their figures
                r = {"variant": v, "error": f"{type(e).__name__}: {e}"[:2000]}
                torch.cuda.empty_cache()
            print(json.dumps(r), flush=True)
            results.append(r)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".partial.json").write_text(json.dumps(results, indent=2) + "\n")
    result = {
        "bench": "trainer_gpu", "shape": args.shape, "params": params, "lm_head_params": head, "samples": args.samples,
        "prompt_len": args.prompt_len, "response_len": args.response_len,
        "max_tokens_per_gpu": args.max_tokens_per_gpu, "peak_tflops": args.peak_tflops,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": results,
    }  # fmt: skip
    print(f"{'variant':<20} {'step s':>8} {'tok/s':>10} {'MFU':>6} {'MFU needed':>10} {'loss':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<20} ERROR {r['error'][:200]}")
        else:
            print(f"{r['variant']:<20} {r['step_s']:>8} {r['tokens_per_s']:>10} {r['mfu']:>6} {r['mfu_needed']:>10} {r['loss']:>10.6f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
