"""--true-on-policy-mode: the sampler's log-probs against the trainer's, and what the mode costs.

    .venv/bin/python bench/true_on_policy.py --out bench/results/true_on_policy_cpu.json
    sh scripts/gpu_env.sh run python3 bench/true_on_policy.py --device cuda --shape qwen3-0.6b \
        --concurrency 1 8 64 256 --tokens 4000 16000 40000 60000 --out $OUT/true_on_policy_gpu.json

--shape tiny (the CPU default): a random Qwen3-shaped model of the demo's size (--hidden 128,
4 layers, 64-token vocabulary; fp32). On the GPU (bf16, the trainer with --bf16): qwen3-0.6b
(28 layers, 151,936-token vocabulary) or qwen3-30b-a3b (its MoE layer, 128 experts, top-8, at
--layers of its 48). For each concurrency (requests decoded together, --concurrency), the engine
in the mode generates until --tokens of its own sampled tokens are in hand (one count, or one per
concurrency; response lengths spread over 1x-2x --response-len so rows leave and join
mid-flight); the trainer (Actor, same mode) computes the log-probs of every one of them, and the
bench reports max |trainer - sampler| (the mode promises exactly 0.0) with the token count. Cost:
engine tokens/s and the trainer's training step (forward+backward+AdamW on 64 of the samples),
mode on against off (off: the engine's defaults, fused decode and CUDA graphs on the GPU),
interleaved in one run (--repeats each); the JSON carries every timing.

--invariant-moe-graphs (qwen3-30b-a3b on CUDA) measures the mode's MoE decode in CUDA graphs
(`runner.INVARIANT_MOE_GRAPHS`, the engine's default since session 15's GPU check) beside the mode
without them (the bench's plain "mode" rows for an MoE shape): mismatch rows for both, and a third
engine setting in the cost rows:

    sh scripts/gpu_env.sh run python3 bench/true_on_policy.py --device cuda --shape qwen3-30b-a3b --layers 2 \
        --concurrency 64 8 1 --tokens 12000 3000 500 --response-len 64 --repeats 1 --invariant-moe-graphs \
        --out $OUT/true_on_policy_gpu_moe_graphs.json

--profile first profiles decode steps at each --concurrency with the mode on and off (wall ms,
kernels and GPU-busy ms a step, the largest kernels); --unfused-glue runs the mode's layers without `invariant_fused`'s kernels (the model's own ops);
--split-programs 0 runs its GEMMs without split-K; --attention-rows 64 its attention in the
64-row tiles it had before session 16.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from slipstream.config import config_from_values
from slipstream.kernels import invariant, invariant_gpu
from slipstream.models.config import ModelConfig
from slipstream.models.hf import init_model, load_model, save_model
from slipstream.services.rollout.engine import runner
from slipstream.services.rollout.engine.native import NativeEngine
from slipstream.services.rollout.engine.request import Request
from slipstream.services.trainer.actor import Actor
from slipstream.types import Sample, Status

SHAPES = {
    "qwen3-0.6b": dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True, tie_word_embeddings=False,
    ),
}  # fmt: skip


@functools.cache
def loaded(model_dir: Path, device: str) -> torch.nn.Module:
    return load_model(model_dir, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)


def generate(
    model_dir: Path, mode: bool, concurrency: int, length: int, tokens: int, seed: int, device: str,
    moe_graphs: bool = False,
):  # fmt: skip
    """(samples, decode seconds) until `tokens` sampled tokens, `concurrency` requests at a time;
    `moe_graphs`: the mode's MoE decode in CUDA graphs."""
    runner.INVARIANT_MOE_GRAPHS = moe_graphs  # read when the engine is built
    model = copy.deepcopy(loaded(model_dir, device))  # a fresh engine converts its model in place
    engine = NativeEngine(model, eos_token_ids=[], max_batch_size=concurrency, true_on_policy=mode)
    vocab = model.config.vocab_size
    samples, seconds, n = [], 0.0, 0
    gen = torch.Generator().manual_seed(seed)
    while n < tokens:
        prompts = [torch.randint(3, vocab - 4, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(concurrency)]  # fmt: skip
        reqs = [Request(f"{n}-{i}", p, length + (i * length) // concurrency, seed=seed + n + i)
                for i, p in enumerate(prompts)]  # fmt: skip
        sync(device)
        t = time.perf_counter()
        results = engine.generate(reqs)
        sync(device)
        seconds += time.perf_counter() - t
        for req, res in zip(reqs, results, strict=True):
            samples.append(Sample(
                tokens=req.tokens + res.tokens, response_length=len(res.tokens), reward=0.0,
                status=Status.COMPLETED, rollout_log_probs=res.log_probs, policy_versions=res.versions,
            ))  # fmt: skip
            n += len(res.tokens)
    return samples, seconds


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def mismatch(actor: Actor, samples: list[Sample]) -> tuple[float, int]:
    worst, n = 0.0, 0
    for i in range(0, len(samples), 64):
        part = samples[i : i + 64]
        with torch.no_grad():
            lp = actor.log_probs(actor.tensors(part, [0.0] * len(part)))  # the padded frame, on the device
        for row, s in enumerate(part):
            start = len(s.tokens) - s.response_length - 1
            diff = lp[row, start : start + s.response_length].cpu() - torch.tensor(s.rollout_log_probs)
            worst, n = max(worst, float(diff.abs().max())), n + s.response_length
    return worst, n


def profile_decode(model_dir: Path, mode: bool, concurrency: int, length: int, device: str) -> dict:
    """The engine's decode steps at `concurrency` full rows (CUDA graphs as the engine runs them):
    wall ms a step over 40 steps, then torch.profiler over 10: kernels a step, GPU busy ms a step
    (kernel time summed) and the largest kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    model = copy.deepcopy(loaded(model_dir, device))
    engine = NativeEngine(model, eos_token_ids=[], max_batch_size=concurrency, true_on_policy=mode)
    for i in range(concurrency):
        engine.add_request(Request(f"p{i}", [5 + i % 50] * 8, length // 2 + 64, seed=i))  # outlasts the steps
    for _ in range(2 + length // 2):  # admit, then decode to a mid-length context
        engine.step()
    sync(device)
    t = time.perf_counter()
    for _ in range(40):
        engine.step()
    sync(device)
    wall = (time.perf_counter() - t) / 40
    cuda = device == "cuda"  # on the CPU (a smoke test of the script): ATen ops' own time instead
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
        sync(device)
    rows = []
    for e in prof.key_averages():
        us = e.device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key[:90], "calls_per_step": e.count / 10, "us_per_step": us / 10})
    rows.sort(key=lambda r: -r["us_per_step"])
    engine.abort_all()
    return {
        "concurrency": concurrency, "mode": mode, "wall_ms_per_step": 1e3 * wall,
        "kernels_per_step": sum(r["calls_per_step"] for r in rows),
        "gpu_busy_ms_per_step": sum(r["us_per_step"] for r in rows) / 1e3, "top": rows[:20],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of qwen3-30b-a3b (tiny: 4)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[25_000],
        help="sampled tokens per concurrency (one, or one each)",
    )
    parser.add_argument("--response-len", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=128, help="of --shape tiny")
    parser.add_argument(
        "--repeats", type=int, default=2, help="cost rows per setting (0: the mismatch alone)"
    )
    parser.add_argument(
        "--cost-tokens", type=int, default=None,
        help="sampled tokens per cost row (at least one wave of --concurrency requests); default "
        "min(--tokens, 8 x concurrency x --response-len)",
    )  # fmt: skip
    parser.add_argument(
        "--invariant-moe-graphs", action="store_true",
        help="qwen3-30b-a3b on cuda: the mode's MoE decode in CUDA graphs (the engine's default) beside "
        "it without them (the plain mode rows): its own mismatch and cost rows",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="first profile the decode step, mode on and off, at each --concurrency (cuda)",
    )  # fmt: skip
    parser.add_argument(
        "--split-programs", type=int, default=None,
        help="invariant_gpu.SPLIT_PROGRAMS for the run (0: no split-K in the mode's GEMMs)",
    )  # fmt: skip
    parser.add_argument(
        "--attention-rows", type=int, default=None,
        help="invariant_gpu.QUERY_ROWS for the run: the mode's attention tile rows (default 16)",
    )  # fmt: skip
    parser.add_argument(
        "--unfused-glue", action="store_true",
        help="the mode's layers with the model's own ops between the GEMMs (invariant.FUSED_GLUE off)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if len(args.tokens) not in (1, len(args.concurrency)):
        parser.error("--tokens takes one count or one per --concurrency")
    if args.invariant_moe_graphs and (args.device, args.shape) != ("cuda", "qwen3-30b-a3b"):
        parser.error("--invariant-moe-graphs is for --shape qwen3-30b-a3b on --device cuda")
    # (mode, MoE graphs): the mode as the engine runs it, the mode with MoE graphs, the default
    settings = [(True, False), *[(True, True)] * args.invariant_moe_graphs, (False, False)]
    counts = args.tokens * len(args.concurrency) if len(args.tokens) == 1 else args.tokens
    tokens = dict(zip(args.concurrency, counts, strict=True))
    torch.set_num_threads(args.threads)
    positions = 4 * args.response_len + 16
    if args.shape == "tiny":
        cfg = ModelConfig(
            vocab_size=64, hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
            max_position_embeddings=positions, tie_word_embeddings=True,
        )  # fmt: skip
    else:
        layers = 28 if args.shape == "qwen3-0.6b" else args.layers
        cfg = ModelConfig(**SHAPES[args.shape], num_hidden_layers=layers, max_position_embeddings=positions)
    model_dir = Path(tempfile.mkdtemp()) / "model"
    save_model(init_model(cfg, seed=0), model_dir)
    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=8, n_samples_per_prompt=8, micro_batch_size=16,
        device=args.device, rollout_max_response_len=2 * args.response_len, bf16=args.device == "cuda",
    )  # fmt: skip
    actors = {mode: Actor.from_config(config_from_values({**values, "true_on_policy_mode": mode}))
              for mode in (True, False)}  # fmt: skip
    dtype = "bf16" if args.device == "cuda" else "fp32"
    result: dict = {"model": f"{args.shape} ({cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}), {dtype}",
                    "device": args.device, "threads": args.threads, "argv": sys.argv[1:],
                    "mismatch": [], "engine": [], "train_step": []}  # fmt: skip
    if args.unfused_glue:
        invariant.FUSED_GLUE = False
        result["fused_glue"] = False
    if args.attention_rows is not None:
        invariant_gpu.QUERY_ROWS = args.attention_rows
        result["attention_rows"] = args.attention_rows
    if args.split_programs is not None:
        invariant_gpu.SPLIT_PROGRAMS = args.split_programs
        result["split_programs"] = args.split_programs
    if args.profile:
        result["profile"] = []
        for c in args.concurrency:
            for mode in (True, False):
                result["profile"].append(profile_decode(model_dir, mode, c, args.response_len, args.device))
                print(json.dumps({k: v for k, v in result["profile"][-1].items() if k != "top"}), flush=True)
                save(result, args.out)
    for c in args.concurrency:
        for moe_graphs in [graphs for mode, graphs in settings if mode]:
            samples, seconds = generate(
                model_dir, True, c, args.response_len, tokens[c], seed=c, device=args.device,
                moe_graphs=moe_graphs,
            )  # fmt: skip
            worst, n = mismatch(actors[True], samples)
            row = {"concurrency": c, "moe_graphs": moe_graphs, "tokens": n, "max_abs_diff": worst}
            print(json.dumps(row), flush=True)
            result["mismatch"].append(row)
            save(result, args.out)
        for r in range(args.repeats):  # cost: tokens/s with the mode on and off, interleaved
            for mode, moe_graphs in settings:
                budget = args.cost_tokens or min(tokens[c], 8 * c * args.response_len)
                samples, seconds = generate(
                    model_dir, mode, c, args.response_len, budget, seed=r, device=args.device,
                    moe_graphs=moe_graphs,
                )  # fmt: skip
                n = sum(s.response_length for s in samples)
                result["engine"].append({
                    "concurrency": c, "mode": mode, "moe_graphs": moe_graphs, "repeat": r,
                    "tokens_per_s": n / seconds,
                })  # fmt: skip
                print(json.dumps(result["engine"][-1]), flush=True)
                save(result, args.out)
    if not args.repeats:  # --repeats 0: the mismatch alone
        return
    batch = samples[:64]
    for actor in actors.values():  # a first step compiles kernels and grows caches: not timed
        actor.train_rollout(batch, [1.0, -1.0] * (len(batch) // 2))
    for r in range(args.repeats):
        for mode, actor in actors.items():
            sync(args.device)
            t = time.perf_counter()
            actor.train_rollout(batch, [1.0, -1.0] * (len(batch) // 2))
            sync(args.device)
            result["train_step"].append({"mode": mode, "repeat": r, "seconds": time.perf_counter() - t})
            print(json.dumps(result["train_step"][-1]), flush=True)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    def tokens_per_s(c: int, mode: bool, moe_graphs: bool = False) -> float:
        key = (c, mode, moe_graphs)
        rows = [e for e in result["engine"] if (e["concurrency"], e["mode"], e["moe_graphs"]) == key]
        return median([e["tokens_per_s"] for e in rows])

    result["cost"] = {
        "engine_tokens_per_s_ratio": {
            c: tokens_per_s(c, True) / tokens_per_s(c, False) for c in args.concurrency
        },
        "train_step_time_ratio": median([s["seconds"] for s in result["train_step"] if s["mode"]])
        / median([s["seconds"] for s in result["train_step"] if not s["mode"]]),
    }
    if args.invariant_moe_graphs:  # the mode with MoE graphs against the default
        result["cost"]["engine_tokens_per_s_ratio_moe_graphs"] = {
            c: tokens_per_s(c, True, True) / tokens_per_s(c, False) for c in args.concurrency
        }
    print(json.dumps(result["cost"]), flush=True)
    save(result, args.out)


def save(result: dict, out: Path | None) -> None:
    """The JSON so far (rewritten after every row: a run cut by its time limit keeps what it measured)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
