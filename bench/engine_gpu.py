"""Engine throughput on one GPU: our native engine (bf16; FP8 weights; FP8 KV cache; both) next to
`transformers` `generate` and the HBM roofline, on the same random Qwen3-0.6B-shaped weights, in one run.

    python bench/engine_gpu.py [--batch-sizes 1 64 256] [--prompt-len 128] [--new-tokens 256]
                               [--out bench/results/engine_gpu.json]

Every sequence samples exactly --new-tokens tokens at temperature 1 (EOS ignored on both sides,
so the work is identical) from a distinct random --prompt-len prompt. Tokens/s counts generated
tokens over the wall time of the whole batch, prefill included; each of ours is the best of two
timed runs after a warm-up run (which captures the CUDA graphs), transformers' is one run after a
short warm-up. The roofline reads all weights plus the KV cache at the mean context once per
decode step at --hbm-tbps (4.3 TB/s measured on the H200 with a device-to-device copy), with a
bf16 cache (an FP8 cache reads half of that part). Also in the JSON: the GPU time of one graphed
decode step alone next to the wall-clock step at the same KV bucket (the median time between two
`step()` returns while only decoding; their difference is the host time the GPU waits on, 0 when the
host keeps ahead), kernel time by name over one decode step at the largest batch (eager and
replayed from its graph), and each FP8 variant's log-prob agreement with bf16 (`agreement`). The
replay is timed with every row at the middle of the lengths the run decoded in that bucket (the
graph reads the slots' tables). `host_profile`: the CUDA runtime calls and ATen ops of 30
decode-only steps by host time, and how long a step waits for the GPU.
`--attention-sweep` first times decode-attention block/warp/stage choices and uses the fastest.

Before and after in one process: each batch runs the engine as `--variants` name them (the
sampler's knobs, `SAMPLER_VARIANTS`), --repeats times each, interleaved: `before` is the
one-program-a-row sampler (4096 logits a step, 8 warps), `b2048` the split over the vocabulary
in runs of 2048-logit blocks, `default` the engine as it is (`kernels/sampling.py`);
`ours_bf16` is the last variant's first run, and the graphed step is profiled under the first and
the last. `sampler_sweep` times the sampler alone in a CUDA graph under each of `SAMPLER_SWEEP`'s
knobs. `--attention-splits` times decode attention at the largest batch with the keys split
across programs or not.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from slipstream.models import Qwen3Config, Qwen3ForCausalLM


def qwen3_06b() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=40960, eos_token_id=151645,
    )  # fmt: skip


def random_model(config: Qwen3Config, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model.to(torch.bfloat16).eval()


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def bench_ours(
    model, batch, args, fp8: bool, kv_cache_dtype: str = "auto", profile_host: bool = True
) -> dict:
    from slipstream.services.rollout.engine import NativeEngine, Request
    from slipstream.services.rollout.engine.graphs import kv_bucket

    engine = NativeEngine(
        model, eos_token_ids=[], max_batch_size=batch, max_seq_len=args.prompt_len + args.new_tokens,
        fp8=fp8, kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip
    best, step_ms = float("inf"), []
    capacity = args.prompt_len + args.new_tokens
    # Step j (1-based) decodes over prompt_len + j - 1 positions: every sequence moves in lockstep.
    bucket_of_step = [kv_bucket(args.prompt_len + j - 1, capacity) for j in range(1, args.new_tokens + 4)]
    wall_by_kv: dict[int, list[float]] = {}
    for r in range(3):
        reqs = [
            Request(f"{r}-{i}", p, args.new_tokens, temperature=1.0, seed=i)
            for i, p in enumerate(prompts(batch, args.prompt_len, model.config.vocab_size, r))
        ]
        for req in reqs:
            engine.add_request(req)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stamps, done = [], 0
        while engine.has_work():
            done += len(engine.step())
            stamps.append(time.perf_counter())
        dt = time.perf_counter() - t0
        assert done == batch
        if r:
            best = min(best, dt)
            gaps = sorted(b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True))
            step_ms.append(1e3 * gaps[len(gaps) // 2])
            # Decode-only steps: from the second decode step (the first follows the prefill) to the
            # last one that samples (the steps after it retire the batch).
            for j in range(3, args.new_tokens + 1):
                wall_by_kv.setdefault(bucket_of_step[j - 1], []).append(stamps[j - 1] - stamps[j - 2])
    host = host_profile(engine, batch, args) if profile_host else None
    replay_ms = {}
    if engine.graphs:  # GPU time of one graphed decode step alone (no host work in between)
        for (b, kv, _), captured in sorted(engine.graphs.graphs.items()):
            if b == engine.graphs.bucket(batch):
                # Each row at the middle of the lengths the run decoded in this bucket.
                lengths = [
                    n for n in range(args.prompt_len + 1, capacity + 1) if kv_bucket(n, capacity) == kv
                ]
                replay_ms[str(kv)] = time_replay(engine, captured, batch, lengths[len(lengths) // 2])
    wall_ms = {str(kv): round(1e3 * sorted(g)[len(g) // 2], 3) for kv, g in sorted(wall_by_kv.items())}
    return {
        "host_profile": host,
        "tokens_per_s": batch * args.new_tokens / best,
        "seconds": best,
        "decode_step_ms_median": min(step_ms),
        "graph_replay_ms_by_kv_bucket": replay_ms,
        "wall_step_ms_by_kv_bucket": wall_ms,
        "host_ms_by_kv_bucket": {
            kv: round(wall_ms[kv] - ms, 3) for kv, ms in replay_ms.items() if kv in wall_ms
        },
        "graphs_captured": len(engine.graphs.graphs) if engine.graphs else 0,
    }


def time_replay(engine, captured, batch: int, length: int, repeats: int = 20) -> float:
    """GPU milliseconds of one replay of a captured decode step with `batch` rows live at `length`.

    The graph reads the slots' device tables and moves the lengths on itself (`graphs.py`), so
    each replay starts one position further: `repeats` + 1 positions past `length` must stay
    inside the cache (the rows' lengths after a finished run are past it: replaying there writes
    out of bounds)."""
    graphs, slots = engine.graphs, engine.runner.slots
    assert length + repeats + 1 <= engine.runner.cache.capacity, "replays would run past the cache"
    graphs.set_running(batch)
    slots.dev_ints[0, :batch] = length
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    captured.graph.replay()
    start.record()
    for _ in range(repeats):
        captured.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeats, 3)


def host_profile(engine, batch: int, args, steps: int = 30) -> dict:
    """Where the host's time goes in decode-only steps: the CUDA runtime calls and the ATen ops the
    steps make, host microseconds a step by name (torch.profiler's host side; its own overhead is
    in these figures), and how long a step waits for the GPU (`cudaEventSynchronize`, reading the
    last step's finishes): a step that waits is GPU-bound, one that does not is host-bound."""
    from torch.profiler import ProfilerActivity, profile

    from slipstream.services.rollout.engine import Request

    for i, p in enumerate(prompts(batch, args.prompt_len, engine.model.config.vocab_size, 7)):
        engine.add_request(Request(f"h{i}", p, steps + 8, temperature=1.0, seed=i))
    for _ in range(4):  # admit, then decode-only steps
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()  # inside: the profiler's start-up is not a step's
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t0
    while engine.has_work():
        engine.step()
    rows = [
        {
            "name": e.key[:60],
            "calls_per_step": round(e.count / steps, 2),
            "us_per_step": round(e.self_cpu_time_total / steps, 1),
        }
        for e in prof.key_averages()
        if e.self_cpu_time_total > 0
    ]
    rows.sort(key=lambda r: -r["us_per_step"])
    wait = sum(
        r["us_per_step"] for r in rows if r["name"] in ("cudaEventSynchronize", "cudaStreamSynchronize")
    )
    return {
        "wall_ms_per_step_profiled": round(1e3 * wall / steps, 3),
        "wait_us_per_step": round(wait, 1),
        "top": rows[:20],
    }


def _time_rotating(fn, q, ks, vs, lengths, kw) -> float:
    """Median microseconds of fn over the cache copies in turn (so the L2 holds none of them)."""
    import triton

    calls = iter(range(1 << 30))

    def call():
        i = next(calls) % len(ks)
        fn(q, ks[i], vs[i], lengths, **kw)

    return 1e3 * triton.testing.do_bench(call, warmup=10, rep=40, return_mode="median")


def attention_sweep(config: Qwen3Config, args, kv_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Decode-attention configurations at the bench's mean context, each checked against SDPA:
    block/warps/stages at the largest batch (the fastest becomes the module default for this run),
    then 1 vs 4 splits at every batch with that choice."""
    from slipstream.kernels import attention

    hkv, h, d = config.num_key_value_heads, config.num_attention_heads, config.head_dim
    capacity = args.prompt_len + args.new_tokens
    context = args.prompt_len + args.new_tokens // 2
    rows = []

    def measure(batch: int, configs: list[dict]) -> None:
        g = torch.Generator(device="cuda").manual_seed(batch)
        q = torch.randn(batch, h, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
        # four layers' worth of cache, used in turn, so the timing is not the L2's
        shape = (batch, hkv, capacity, d)
        ks = [torch.randn(shape, device="cuda", generator=g).to(kv_dtype) for _ in range(4)]
        vs = [torch.randn(shape, device="cuda", generator=g).to(kv_dtype) for _ in range(4)]
        lengths = torch.full((batch,), context, device="cuda")
        mask = (torch.arange(capacity, device="cuda")[None, :] < lengths[:, None])[:, None, None]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), ks[0].float(), vs[0].float(), attn_mask=mask, enable_gqa=True
        )
        kv_bytes = 2 * batch * hkv * context * d * kv_dtype.itemsize
        for kw in configs:
            try:
                out = attention.decode_attention(q, ks[0], vs[0], lengths, **kw)
                err = float((out.float() - ref).norm() / ref.norm())
                us = _time_rotating(attention.decode_attention, q, ks, vs, lengths, kw)
            except Exception as e:  # a configuration that does not compile (shared memory)
                rows.append({"batch": batch, **kw, "error": str(e)[:80]})
                continue
            rows.append(
                {
                    "batch": batch,
                    **kw,
                    "us": round(us, 1),
                    "rel_err": err,
                    "tb_per_s": round(kv_bytes / us / 1e6, 2),
                }
            )

    big = max(args.batch_sizes)
    measure(
        big,
        [
            dict(block_n=bn, num_warps=w, num_stages=st, splits=1)
            for bn in (64, 128, 256)
            for w in (4, 8)
            for st in (2, 3, 4)
        ],
    )
    top = min((r for r in rows if "us" in r and r["rel_err"] < 1e-2), key=lambda r: r["us"])
    attention.BLOCK_N, attention.NUM_WARPS, attention.NUM_STAGES = (
        top["block_n"],
        top["num_warps"],
        top["num_stages"],
    )
    for batch in args.batch_sizes:  # small batches are host-bound here (no graph): a pointer only
        measure(batch, [dict(splits=1), dict(splits=4)])
    return {"chosen": top, "rows": rows}


def set_variant(name: str) -> None:
    """The sampler's knobs for a before/after variant (read when a graph is captured: set them
    before building the engine)."""
    from slipstream.kernels import sampling

    sampling.BLOCK, sampling.WARPS, sampling.PARTS = SAMPLER_VARIANTS[name]


def _graph_us(fn, calls: list[tuple], reps: int = 20) -> float:
    """Microseconds of one call of fn replayed from a CUDA graph of `reps` calls, call i on the
    arguments calls[i % len(calls)] (launch gaps out of the figure, as in the engine's graphed step)."""
    fn(*calls[0])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(*calls[i % len(calls)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def sampler_sweep(config: Qwen3Config, batch_sizes: list[int]) -> list[dict]:
    """The fused sampler alone on [batch, vocab] logits, in a CUDA graph, under each of
    SAMPLER_SWEEP's blocks/warps/parts; each must draw the first setting's tokens."""
    from slipstream.kernels import sampling

    rows = []
    for batch in batch_sizes:
        g = torch.Generator(device="cuda").manual_seed(batch)
        logits = [
            torch.randn(batch, config.vocab_size, device="cuda", generator=g).to(torch.bfloat16)
            for _ in range(4)
        ]
        temps = torch.ones(batch, device="cuda")
        seeds = torch.arange(batch, device="cuda")
        positions = torch.full((batch,), 200, device="cuda")
        row = {"batch": batch}
        for name, knobs in SAMPLER_SWEEP.items():
            sampling.BLOCK, sampling.WARPS, sampling.PARTS = knobs
            tokens, lps = sampling.sample(logits[0], temps, seeds, positions)
            if len(row) == 1:
                ref_tokens, ref_lps = tokens, lps
            else:
                row[f"{name}_same_tokens"] = bool(torch.equal(tokens, ref_tokens))
                row[f"{name}_max_abs_log_prob_diff"] = float((lps - ref_lps).abs().max())
            calls = [(lg, temps, seeds, positions) for lg in logits]
            row[f"{name}_us"] = round(_graph_us(sampling.sample, calls), 2)
        set_variant("default")
        rows.append(row)
        print("sampler:", json.dumps(row), flush=True)
    return rows


def _sampler_defaults() -> tuple[int, int, int]:
    from slipstream.kernels import sampling

    return sampling.BLOCK, sampling.WARPS, sampling.PARTS


SAMPLER_AFTER = _sampler_defaults()
# name -> (BLOCK, WARPS, PARTS) of kernels/sampling.py. Session 13's call (b48aac3's bench) ran
# session 12's kernel (four block reductions a block, removed since) against the per-lane one.
SAMPLER_VARIANTS = {
    "before": (4096, 8, 1),  # one program a row
    "b2048": (2048, 4, 32),  # session 12's block
    "default": SAMPLER_AFTER,
}
SAMPLER_SWEEP = {
    "b2048": (2048, 4, 32),
    "default": SAMPLER_AFTER,
    "b1024_w2": (1024, 2, 32),
    "b512": (512, 4, 32),
}


def attention_splits(config: Qwen3Config, args) -> list[dict]:
    """Decode attention at the largest batch, one program per (sequence, KV head) against the keys
    split across 2-3 programs (`splits`, merged by a second kernel), at the bench's mean context
    and a longer one; measured only (the engine's choice is `attention.num_splits`)."""
    from slipstream.kernels import attention

    hkv, h, d = config.num_key_value_heads, config.num_attention_heads, config.head_dim
    capacity, batch = args.prompt_len + args.new_tokens, max(args.batch_sizes)
    g = torch.Generator(device="cuda").manual_seed(batch)
    q = torch.randn(batch, h, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
    shape = (batch, hkv, capacity, d)  # four layers' worth of cache, used in turn (not the L2's)
    ks = [torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)]
    vs = [torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)]
    rows = []
    for context in (args.prompt_len + args.new_tokens // 2 + 2, capacity - 64):
        lengths = torch.full((batch,), context, device="cuda")
        mask = (torch.arange(capacity, device="cuda")[None, :] < lengths[:, None])[:, None, None]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), ks[0].float(), vs[0].float(), attn_mask=mask, enable_gqa=True
        )
        kv_bytes = 2 * batch * hkv * context * d * 2
        for bn, w, st, sp in [
            (128, 4, 2, 1),
            (128, 4, 2, 2),
            (64, 4, 3, 1),
            (64, 4, 3, 2),
            (64, 4, 3, 3),
            (32, 4, 3, 2),
        ]:
            kw = dict(block_n=bn, num_warps=w, num_stages=st, splits=sp)
            out = attention.decode_attention(q, ks[0], vs[0], lengths, **kw)
            err = float((out.float() - ref).norm() / ref.norm())
            us = _time_rotating(attention.decode_attention, q, ks, vs, lengths, kw)
            row = {"batch": batch, "context": context, **kw, "us": round(us, 1), "rel_err": err}
            rows.append({**row, "tb_per_s": round(kv_bytes / us / 1e6, 2)})
            print("attention:", json.dumps(rows[-1]), flush=True)
    return rows


VARIANTS = {  # name -> NativeEngine options, each against bf16 weights and a bf16 cache
    "ours_fp8": dict(fp8=True),
    "ours_bf16_fp8kv": dict(fp8=False, kv_cache_dtype="fp8_e4m3"),
    "ours_fp8_fp8kv": dict(fp8=True, kv_cache_dtype="fp8_e4m3"),
}


def agreement(config: Qwen3Config, args, batch: int = 64, new_tokens: int = 64) -> dict:
    """Log-prob agreement of each variant with bf16: same prompts and seeds at temperature 1, so the
    runs sample the same tokens until a near-tie flips; |log-prob difference| over those shared
    prefixes, and the fraction of tokens they cover."""
    from slipstream.services.rollout.engine import NativeEngine, Request

    reqs = [
        Request(f"a{i}", p, new_tokens, temperature=1.0, seed=i)
        for i, p in enumerate(prompts(batch, args.prompt_len, config.vocab_size, 11))
    ]

    def run(**kw):
        engine = NativeEngine(
            random_model(config), eos_token_ids=[], max_batch_size=batch,
            max_seq_len=args.prompt_len + new_tokens, **kw,
        )  # fmt: skip
        return engine.generate(reqs)

    base = run()
    out = {}
    for name, kw in VARIANTS.items():
        diffs, shared = [], 0
        for x, y in zip(base, run(**kw), strict=True):
            for s, t, p, q in zip(x.tokens, y.tokens, x.log_probs, y.log_probs, strict=True):
                if s != t:
                    break
                diffs.append(abs(p - q))
                shared += 1
        d = torch.tensor(diffs)
        out[name] = {
            "shared_token_fraction": shared / (batch * new_tokens),
            "mean_abs_log_prob_diff": float(d.mean()),
            "max_abs_log_prob_diff": float(d.max()),
        }
    return out


def bench_hf(model, batch, args) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers import Qwen3Config as HFConfig

    hf_cfg = HFConfig(**{k: v for k, v in model.config.to_hf_dict().items() if k != "architectures"})
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()

    def run(b, n):
        ids = torch.tensor(prompts(b, args.prompt_len, model.config.vocab_size, 9), device="cuda")
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                top_p=1.0, top_k=0, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        torch.cuda.synchronize()
        return out

    run(batch, 4)  # warm-up
    t0 = time.perf_counter()
    out = run(batch, args.new_tokens)
    dt = time.perf_counter() - t0
    assert out.shape[1] == args.prompt_len + args.new_tokens
    return {"tokens_per_s": batch * args.new_tokens / dt, "seconds": dt}


def roofline(config: Qwen3Config, batch: int, args, weight_bytes: int) -> dict:
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    mean_context = args.prompt_len + args.new_tokens / 2
    step_bytes = weight_bytes + batch * mean_context * kv_per_token
    step_s = step_bytes / (args.hbm_tbps * 1e12)
    return {"tokens_per_s": batch / step_s, "step_ms": 1e3 * step_s, "step_gb": step_bytes / 1e9}


def profile_step(model, batch, args, graphs: bool = False) -> list[dict]:
    """Kernel time by name over one decode step (eager, or replayed from its graph), the largest batch."""
    from torch.profiler import ProfilerActivity, profile

    from slipstream.services.rollout.engine import NativeEngine, Request

    engine = NativeEngine(
        model, eos_token_ids=[], max_batch_size=batch,
        max_seq_len=args.prompt_len + args.new_tokens, cuda_graphs=graphs,
    )  # fmt: skip
    for i, p in enumerate(prompts(batch, args.prompt_len, model.config.vocab_size, 5)):
        engine.add_request(Request(f"p{i}", p, args.new_tokens, temperature=1.0, seed=i))
    for _ in range(130):  # admit, then decode to a mid-length context
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key[:90], "calls": e.count, "us": round(t, 1)})
    rows.sort(key=lambda r: -r["us"])
    engine.abort_all()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hbm-tbps", type=float, default=4.3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-fp8", action="store_true")
    ap.add_argument("--attention-sweep", action="store_true", help="tune decode attention first")
    ap.add_argument(
        "--attention-splits", action="store_true", help="time split-KV decode attention at the largest batch"
    )
    ap.add_argument(
        "--sweep-only", choices=["bf16", "fp8"], help="only the attention sweep, this cache dtype"
    )
    ap.add_argument("--hf-batch-sizes", type=int, nargs="+", help="transformers at these batches only")
    ap.add_argument(
        "--variants", nargs="+", default=["b2048", "default"], choices=list(SAMPLER_VARIANTS),
        help="bf16 engine variants, each --repeats times",
    )  # fmt: skip
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved")
    ap.add_argument("--out", default="bench/results/engine_gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("engine_gpu: needs a CUDA device")

    config = qwen3_06b()
    if args.sweep_only:
        kv = torch.float8_e4m3fn if args.sweep_only == "fp8" else torch.bfloat16
        sweep = attention_sweep(config, args, kv)
        Path(args.out).write_text(json.dumps(sweep, indent=2) + "\n")
        for r in sweep["rows"]:
            print(json.dumps(r))
        return
    model = random_model(config)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": "Qwen3-0.6B shape, random init, bf16, tied embeddings",
        "weight_bytes": weight_bytes,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rows": [],
    }
    if args.attention_sweep:
        result["attention_sweep"] = attention_sweep(config, args)
        print("attention:", json.dumps(result["attention_sweep"]["chosen"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each stage: a call cut by its time limit keeps what it measured
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    result["sampler_sweep"] = sampler_sweep(config, args.batch_sizes)
    save()
    if args.attention_splits:
        result["attention_splits"] = attention_splits(config, args)
        save()
    for batch in args.batch_sizes:
        row = {"batch": batch, "roofline": roofline(config, batch, args, weight_bytes), "variants": {}}
        names = args.variants
        for _ in range(args.repeats):
            for name in names:
                set_variant(name)
                run = bench_ours(model, batch, args, fp8=False, profile_host=name == names[-1])
                row["variants"].setdefault(name, []).append(run)
                print(f"batch {batch} {name}: {run['tokens_per_s']:.0f} tokens/s", flush=True)
        for name, runs in row["variants"].items():
            tps = [r["tokens_per_s"] for r in runs]
            row[f"{name}_tokens_per_s"] = [min(tps), max(tps)]
            row[f"{name}_over_roofline"] = [t / row["roofline"]["tokens_per_s"] for t in (min(tps), max(tps))]
        row["ours_bf16"] = row["variants"][names[-1]][0]
        row["ours_variant"] = names[-1]
        result["rows"].append(row)  # saved now and again below: a cut call keeps the variants
        save()
        set_variant(names[-1])  # the FP8 rows and the profiles run the last variant
        if not args.skip_fp8:
            for name, kw in VARIANTS.items():
                row[name] = bench_ours(random_model(config), batch, args, **kw)
                row[name.replace("ours_", "") + "_over_bf16"] = (
                    row[name]["tokens_per_s"] / row["ours_bf16"]["tokens_per_s"]
                )
        if not args.skip_hf and (args.hf_batch_sizes is None or batch in args.hf_batch_sizes):
            row["transformers"] = bench_hf(model, batch, args)
        ours = row["ours_bf16"]["tokens_per_s"]
        row["ours_over_roofline"] = ours / row["roofline"]["tokens_per_s"]
        if "transformers" in row:
            row["ours_over_transformers"] = ours / row["transformers"]["tokens_per_s"]
            for name in row["variants"]:
                row[f"{name}_over_transformers"] = [
                    t / row["transformers"]["tokens_per_s"] for t in row[f"{name}_tokens_per_s"]
                ]
        save()
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    if not args.skip_fp8:
        result["agreement_with_bf16"] = agreement(config, args)
        print("agreement:", json.dumps(result["agreement_with_bf16"]), flush=True)
    biggest = max(result["rows"], key=lambda r: r["batch"])
    set_variant(biggest["ours_variant"])
    result["profile_variant"] = biggest["ours_variant"]
    result["profile_eager_step"] = profile_step(model, max(args.batch_sizes), args)[:25]
    result["profile_graph_step"] = profile_step(model, max(args.batch_sizes), args, graphs=True)[:25]
    if len(args.variants) > 1:  # the first variant named is the "before"
        set_variant(args.variants[0])
        result["profile_variant_before"] = args.variants[0]
        result["profile_graph_step_before"] = profile_step(model, max(args.batch_sizes), args, graphs=True)[
            :25
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{'batch':>5} {'bf16':>8} {'fp8':>8} {'bf16+kv8':>8} {'fp8+kv8':>8} {'hf':>8} {'roofline':>9} "
        f"{'x hf':>6} {'%roof':>6}"
    )
    for r in result["rows"]:
        tps = [r.get(k, {}).get("tokens_per_s", 0) for k in ("ours_bf16", *VARIANTS, "transformers")]
        print(
            f"{r['batch']:>5} "
            + " ".join(f"{t:>8.0f}" for t in tps)
            + f" {r['roofline']['tokens_per_s']:>9.0f} "
            f"{r.get('ours_over_transformers', 0):>6.1f} {100 * r['ours_over_roofline']:>5.1f}%"
        )
    print("wall-clock decode step vs its graph replay (ms), bf16, by KV bucket:")
    for r in result["rows"]:
        ours = r["ours_bf16"]
        for kv, replay in ours["graph_replay_ms_by_kv_bucket"].items():
            wall = ours["wall_step_ms_by_kv_bucket"].get(kv)
            if wall is not None:
                print(
                    f"  batch {r['batch']:>4} kv {kv:>5}: step {wall:7.3f}  replay {replay:7.3f}  host {wall - replay:+.3f}"
                )
    print("host profile, decode-only steps (us a step; torch.profiler's overhead included):")
    for r in result["rows"]:
        host = r["ours_bf16"]["host_profile"]
        if host is None:
            continue
        top = ", ".join(f"{t['name']} {t['us_per_step']:.0f}" for t in host["top"][:8])
        print(f"  batch {r['batch']:>4}: wait for the GPU {host['wait_us_per_step']:.0f}  |  {top}")
    for r in result["rows"]:
        ranges = ", ".join(
            f"{name} {r[f'{name}_tokens_per_s'][0]:.0f}-{r[f'{name}_tokens_per_s'][1]:.0f}"
            f" ({100 * r[f'{name}_over_roofline'][0]:.1f}-{100 * r[f'{name}_over_roofline'][1]:.1f}%)"
            for name in r["variants"]
        )
        print(f"batch {r['batch']:>4} tokens/s over repeats: {ranges}")
    for key in ("profile_eager_step", "profile_graph_step", "profile_graph_step_before"):
        if key not in result:
            continue
        total = sum(p["us"] for p in result[key])
        print(f"{key}: {total:.0f} us in the top 25")
        for p in result[key][:12]:
            print(f"  {p['us']:>9.1f} us {p['calls']:>5}x  {p['name']}")


if __name__ == "__main__":
    main()
