"""Decode tokens/s by weight format on one GPU: bf16, FP8 (weights and KV cache), FP8 weights
alone, and W4A16 (int4 weights), at several batch sizes, on the Qwen3-0.6B shape and on the
Qwen3-8B shape (where the GEMMs, not attention, dominate a step; --layers-8b takes a slice of its
36 layers), in one run.

    python bench/precision_gpu.py [--batch-sizes 1 16 64 256] [--prompt-len 128] [--new-tokens 64]
                                  [--layers-8b 36] [--shapes 0.6b 8b] [--formats bf16 fp8 fp8_weights w4a16] [--skip-kernels | --skip-engine]
                                  [--variants [NAME ...]] [--repeats 1] [--profile] [--gemm-sweep] [--sweep-shapes 8b]
                                  [--out bench/results/precision_gpu.json]

Our engine as the rollout server runs it (`NativeEngine`: fused decode step, CUDA graphs), random
init, every sequence sampling --new-tokens tokens at temperature 1 from a distinct random
--prompt-len prompt, EOS ignored. Per (shape, format, batch): a short warm-up run that captures
the same graphs (4 new tokens already reach the timed run's KV bucket), then one timed run.
`decode_tokens_per_s` is batch / the median wall-clock decode step (host included, prefill
excluded); `graph_replay_ms` is the GPU time of one replayed decode step at the final context (no
host work); `tokens_per_s` counts the whole run, prefill included. The ratios to bf16 are of
`decode_tokens_per_s`. Targets (issue 16): FP8 >= 1.25x bf16 at batch 64 and 256, W4A16 >= 1.8x
bf16 at batch 1. --variants adds the formats under other GEMM choices (VARIANTS) at the batch
sizes each can change; --profile adds GPU time by kernel over replays of PROFILED's graphs.

Also in the JSON, so a missed target can be read off: each layer GEMM of both shapes alone
(bf16 `F.linear`, our FP8 block-scaled GEMM, `torch._scaled_mm` row-wise and block-wise where
this torch/cuBLAS takes them, our W4A16 GEMM) at each batch size, and decode attention over a
bf16 and an FP8 cache, each timed over rotating copies so the L2 holds none of them.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from engine_gpu import prompts, qwen3_06b, random_model, time_replay

from slipstream.models import Qwen3Config

FORMATS = {  # name: (NativeEngine keywords, int4 weights)
    "bf16": ({}, False),
    "fp8": ({"fp8": True, "kv_cache_dtype": "fp8_e4m3"}, False),
    "fp8_weights": ({"fp8": True}, False),
    "w4a16": ({}, True),
}
# --variants: the same formats with another GEMM choice (kernels/gemm_plan.py's and fp8_linear.py's
# knobs), side by side with the defaults in one run, at the batch sizes where the choice can
# differ. name: (format, {module.attribute: value}, batch sizes).
VARIANTS = {
    "fp8_cublas_64": ("fp8", {"fp8_linear.CUBLAS_FROM_M": 64}, [64]),
    "fp8_cublas_small_16": ("fp8", {"fp8_linear.CUBLAS_SMALL_FROM_M": 16}, [16, 64]),
    "fp8_merge_rolled": ("fp8", {"gemm_plan.MERGE_UNROLL": False}, [1, 64]),
    "fp8_block_n_128": ("fp8", {"gemm_plan.DECODE_BLOCK_N": 128}, [64]),
    "fp8_split_4": ("fp8", {"gemm_plan.SPLIT_PROGRAMS_PER_SM": 4}, [64]),
    "fp8_stages_4": ("fp8", {"gemm_plan.DECODE_STAGES": 4}, [64]),
    "w4a16_gemv_s11": ("w4a16", {"gemm_plan.GEMV_OWN_SCALES": False, "gemm_plan.GEMV_PREFETCH": 0}, [1]),
    "w4a16_own_scales_only": ("w4a16", {"gemm_plan.GEMV_PREFETCH": 0}, [1]),
    "w4a16_ahead_1": ("w4a16", {"gemm_plan.GEMV_PREFETCH": 1}, [1]),  # session 12's default
    "w4a16_gemv_64_rows": ("w4a16", {"gemm_plan.GEMV_BLOCK_N": 64, "gemm_plan.GEMV_PROGRAMS_PER_SM": 8}, [1]),
}  # fmt: skip
# --profile: GPU time by kernel over replays of these (format, batch) decode graphs (first run), and
# of the variants of these formats at these batch sizes.
PROFILED = [("bf16", 1), ("bf16", 64), ("bf16", 256), ("fp8", 64), ("fp8", 256), ("w4a16", 1)]


def _knobs(settings: dict) -> dict:
    """Set `module.ATTR` knobs of slipstream.kernels; returns the previous values."""
    import importlib

    previous = {}
    for name, value in settings.items():
        module, attr = name.rsplit(".", 1)
        mod = importlib.import_module(f"slipstream.kernels.{module}")
        previous[name] = getattr(mod, attr)
        setattr(mod, attr, value)
    return previous


def _plan_knobs() -> dict:
    """The GEMM choices this run's defaults make (kernels/gemm_plan.py, fp8_linear.py)."""
    from slipstream.kernels import fp8_linear, gemm_plan

    names = [n for n in dir(gemm_plan) if n.isupper() and not n.startswith("_")]
    cublas = {n: getattr(fp8_linear, n) for n in dir(fp8_linear) if n.startswith("CUBLAS_")}
    return {n: getattr(gemm_plan, n) for n in names} | cublas


def qwen3_8b_slice(layers: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        max_position_embeddings=40960, eos_token_id=151645,
    )  # fmt: skip


def _graph(engine, batch: int):
    """The batch's bucket's decode graph at the largest KV bucket it used (None without graphs)."""
    graphs = engine.graphs
    if not graphs:
        return None
    return graphs.graphs[max(k for k in graphs.graphs if k[0] == graphs.bucket(batch))]


def _replay_ms(engine, batch: int, args) -> float | None:
    """One replay of that graph, rows mid-way."""
    graph = _graph(engine, batch)
    if graph is None:
        return None
    return time_replay(engine, graph, batch, args.prompt_len + args.new_tokens // 2, repeats=10)


def replay_profile(engine, batch: int, args, top: int = 12) -> list[dict]:
    """GPU microseconds per decode step by kernel name over 4 replays of the graph (the largest
    `top`), so a step's time can be read off by part: GEMMs, attention, glue, LM head, sampling."""
    from torch.profiler import ProfilerActivity, profile

    graph = _graph(engine, batch)
    if graph is None:
        return []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        time_replay(engine, graph, batch, args.prompt_len + args.new_tokens // 2, repeats=3)
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append({"name": e.key[:80], "calls_per_step": e.count / 4, "us_per_step": round(us / 4, 1)})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:top]


def run_engine(engine, batch: int, args, vocab: int, profiled: bool = False) -> dict:
    from slipstream.services.rollout.engine import Request

    for r, new_tokens in enumerate((4, args.new_tokens)):  # warm-up (captures the graphs), timed
        for i, p in enumerate(prompts(batch, args.prompt_len, vocab, 100 * batch + r)):
            engine.add_request(Request(f"{r}-{i}", p, new_tokens, temperature=1.0, seed=i))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stamps, done = [], 0
        while engine.has_work():
            done += len(engine.step())
            stamps.append(time.perf_counter())
        seconds = time.perf_counter() - t0
        assert done == batch
    gaps = sorted(b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True))  # decode steps only
    step = gaps[len(gaps) // 2]
    row = {
        "decode_tokens_per_s": round(batch / step, 1),
        "decode_step_ms": round(1e3 * step, 4),
        "graph_replay_ms": _replay_ms(engine, batch, args),
        "tokens_per_s": round(batch * args.new_tokens / seconds, 1),
    }
    if profiled:
        row["replay_profile"] = replay_profile(engine, batch, args)
    return row


def bench_shape(name: str, config: Qwen3Config, args, rows: dict, save, profile: bool = False) -> dict:
    """Every format and variant on one shape, into `rows` (calling `save` after each)."""
    from slipstream.kernels.w4a16 import convert_to_w4a16
    from slipstream.services.rollout.engine import NativeEngine

    runs = {fmt: (fmt, *FORMATS[fmt], {}, args.batch_sizes) for fmt in args.formats}
    if args.variants is not None:
        runs |= {
            name: (fmt, *FORMATS[fmt], knobs, [b for b in args.batch_sizes if b in batches])
            for name, (fmt, knobs, batches) in VARIANTS.items()
            if (not args.variants or name in args.variants) and fmt in args.formats
        }
    for fmt, (base, kw, int4, knobs, batch_sizes) in runs.items():
        if not batch_sizes:
            continue
        t0 = time.perf_counter()
        previous = _knobs(knobs)
        model = random_model(config)
        if int4:
            convert_to_w4a16(model)
        engine = NativeEngine(
            model, eos_token_ids=[], max_batch_size=max(args.batch_sizes),
            max_seq_len=args.prompt_len + args.new_tokens, **kw,
        )  # fmt: skip
        weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        rows[fmt] = {"weight_bytes": weight_bytes}
        try:
            for batch in batch_sizes:
                profiled = profile and (base, batch) in PROFILED
                rows[fmt][str(batch)] = run_engine(engine, batch, args, config.vocab_size, profiled)
                print(f"{name} {fmt} batch {batch}: {json.dumps(rows[fmt][str(batch)])}", flush=True)
        except Exception as e:  # a variant that does not compile is recorded; the formats' must run
            if fmt in FORMATS:
                raise
            rows[fmt]["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"{name} {fmt}: {rows[fmt]['error']}", flush=True)
        rows[fmt]["seconds"] = round(time.perf_counter() - t0, 1)
        save()
        _knobs(previous)
        del engine, model
        gc.collect()
        torch.cuda.empty_cache()
    for fmt in [f for f in runs if f in rows and f != "bf16"]:
        rows[f"{fmt}_over_bf16"] = {
            b: round(rows[fmt][b]["decode_tokens_per_s"] / rows["bf16"][b]["decode_tokens_per_s"], 3)
            for b in map(str, args.batch_sizes)
            if b in rows[fmt]
        }
    save()
    return rows


def _time_us(fn, n_copies: int) -> float:
    import triton

    calls = iter(range(1 << 30))
    return round(1e3 * triton.testing.do_bench(lambda: fn(next(calls) % n_copies), warmup=5, rep=25), 2)


def _ours_us(x, xq, xs, fp8: list, int4: list, copies: int) -> dict:
    """Our FP8 block GEMM (activations already quantized) and W4A16 GEMM, in us."""
    from slipstream.kernels.fp8_linear import fp8_matmul
    from slipstream.kernels.w4a16 import w4a16_linear

    return {
        "fp8_block_us": _time_us(lambda i: fp8_matmul(xq, xs, fp8[i][0], fp8[i][1], torch.bfloat16), copies),
        "w4a16_us": _time_us(lambda i: w4a16_linear(x, *int4[i]), copies),
    }


def _gemm_row(x: torch.Tensor, w: dict, copies: int) -> dict:
    """One GEMM at one batch size, per implementation (us); w holds `copies` weights per format."""
    from slipstream.kernels.fp8_linear import fp8_matmul, quantize_rows

    m, k = x.shape
    xq, xs = quantize_rows(x)
    bf16, fp8, rowwise, int4 = w["bf16"], w["fp8"], w["rowwise"], w["int4"]
    row = {
        "bf16_us": _time_us(lambda i: F.linear(x, bf16[i]), copies),
        **_ours_us(x, xq, xs, fp8, int4, copies),
    }
    row["fp8_with_quantize_us"] = _time_us(
        lambda i: fp8_matmul(*quantize_rows(x), *fp8[i][:2], torch.bfloat16), copies
    )
    previous = _knobs({"fp8_linear.CUBLAS_FROM_M": 1})  # fp8_matmul's cuBLAS route, its scale copies too
    row["fp8_cublas_route_us"] = _time_us(lambda i: fp8_matmul(xq, xs, *fp8[i][:2], torch.bfloat16), copies)
    _knobs(previous)
    xs_groups = xs.expand(m, (k + 127) // 128).t().contiguous().t()  # per-128 group, outer-dim-major
    references = {  # torch's own FP8 GEMMs, where this torch/cuBLAS takes them
        "scaled_mm_rowwise_us": lambda i: torch._scaled_mm(
            xq, rowwise[i][0].t(), scale_a=xs, scale_b=rowwise[i][1].t(), out_dtype=torch.bfloat16
        ),
        "scaled_mm_blockwise_us": lambda i: torch._scaled_mm(
            xq, fp8[i][0].t(), scale_a=xs_groups, scale_b=fp8[i][2].t(), out_dtype=torch.bfloat16
        ),
    }
    for name, fn in references.items():
        try:
            row[name] = _time_us(fn, copies)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
            row[name] = f"{type(e).__name__}: {str(e)[:160]}"
    return row


def gemm_table(config: Qwen3Config, batch_sizes: list[int]) -> list[dict]:
    """Each layer GEMM alone, per implementation, in us (weights rotated through >= 256 MB)."""
    from slipstream.kernels.fp8_linear import quantize_rows
    from slipstream.quant import quantize_blockwise
    from slipstream.quant.int4 import quantize_int4

    h, heads, kv, d = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    shapes = {
        "qkv": ((heads + 2 * kv) * d, h),
        "o": (h, heads * d),
        "gate_up": (2 * config.intermediate_size, h),
        "down": (h, config.intermediate_size),
    }
    rows = []
    for gemm, (n, k) in shapes.items():
        copies = max(2, min(16, (256 << 20) // (n * k * 2)))
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        blocks = [quantize_blockwise(w) for w in bf16]
        w = {
            "bf16": bf16,
            "fp8": [(q, s.repeat_interleave(128, 0)[:n].contiguous(), s) for q, s in blocks],
            "rowwise": [quantize_rows(t) for t in bf16],
            "int4": [quantize_int4(t) for t in bf16],
        }
        for m in batch_sizes:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            rows.append({"gemm": gemm, "n": n, "k": k, "m": m, **_gemm_row(x, w, copies)})
            print("gemm", json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


FP8_SWEEP = [  # gemm_plan's (DECODE_BLOCK_N, DECODE_BLOCK_M, DECODE_WARPS, DECODE_STAGES,
    # SPLIT_PROGRAMS_PER_SM) at M >= 16; the first is the default
    (64, 64, 4, 3, 2), (128, 64, 4, 3, 2), (128, 128, 8, 3, 2), (128, 128, 4, 3, 2), (64, 128, 4, 3, 2),
    (128, 64, 4, 4, 1),
]  # fmt: skip
GEMV_SWEEP = [  # W4A16 at M = 1: gemm_plan's (GEMV_BLOCK_N, GEMV_WARPS, GEMV_STAGES,
    # GEMV_PROGRAMS_PER_SM, GEMV_PREFETCH), the first the default; None: the tensor-core kernel
    (128, 4, 3, 4, False), None, (128, 4, 3, 4, True), (128, 4, 3, 8, True), (64, 4, 3, 8, True),
    (128, 4, 3, 8, False), (64, 4, 3, 8, False), (256, 8, 3, 4, False),
]  # fmt: skip
_FP8_KNOBS = ("DECODE_BLOCK_N", "DECODE_BLOCK_M", "DECODE_WARPS", "DECODE_STAGES", "SPLIT_PROGRAMS_PER_SM")
_GEMV_KNOBS = ("GEMV_BLOCK_N", "GEMV_WARPS", "GEMV_STAGES", "GEMV_PROGRAMS_PER_SM", "GEMV_PREFETCH")


def gemm_sweep(config: Qwen3Config, batch_sizes: list[int]) -> list[dict]:
    """Our decode GEMMs under other tilings (kernels/gemm_plan.py's knobs), in us: FP8 at each
    batch size >= 16, W4A16 at batch 1 (its GEMV, and the tensor-core kernel)."""
    from slipstream.kernels.fp8_linear import fp8_matmul, quantize_rows
    from slipstream.kernels.w4a16 import w4a16_linear
    from slipstream.quant import quantize_blockwise
    from slipstream.quant.int4 import quantize_int4

    h, inter = config.hidden_size, config.intermediate_size
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    gemms = {
        "qkv": ((heads + 2 * kv) * d, h),
        "o": (h, heads * d),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
    }
    rows = []
    for gemm, (n, k) in gemms.items():
        copies = max(2, min(16, (256 << 20) // (n * k * 2)))
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        fp8 = [(q, s.repeat_interleave(128, 0)[:n].contiguous()) for q, s in map(quantize_blockwise, bf16)]
        int4 = [quantize_int4(t) for t in bf16]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for setting in GEMV_SWEEP:
            knobs = {"gemm_plan.W4A16_GEMV": setting is not None}
            knobs |= {f"gemm_plan.{a}": v for a, v in zip(_GEMV_KNOBS, setting or (), strict=False)}
            previous = _knobs(knobs)
            us = _time_us(lambda i, x=x, int4=int4: w4a16_linear(x, *int4[i]), copies)
            _knobs(previous)
            rows.append({"gemm": gemm, "n": n, "k": k, "m": 1, "gemv": setting, "w4a16_us": us})
            print("gemm sweep", json.dumps(rows[-1]), flush=True)
        for m in [b for b in batch_sizes if 16 <= b <= 256]:
            xq, xs = quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            for setting in FP8_SWEEP:
                previous = _knobs({f"gemm_plan.{a}": v for a, v in zip(_FP8_KNOBS, setting, strict=True)})
                us = _time_us(
                    lambda i, xq=xq, xs=xs, fp8=fp8: fp8_matmul(xq, xs, *fp8[i], torch.bfloat16), copies
                )
                _knobs(previous)
                rows.append({"gemm": gemm, "n": n, "k": k, "m": m, "fp8_tiles": setting, "fp8_block_us": us})
                print("gemm sweep", json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def _attention_us(q: torch.Tensor, lengths: torch.Tensor, shape: tuple, dtype: torch.dtype, **kw) -> float:
    from slipstream.kernels.attention import decode_attention

    caches = [
        (torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype))
        for _ in range(4)
    ]
    return _time_us(lambda i: decode_attention(q, *caches[i], lengths, **kw), 4)


def attention_table(config: Qwen3Config, batch_sizes: list[int], context: int) -> list[dict]:
    """Decode attention for one layer over a bf16 and an FP8 cache at `context`, in us (FP8 also at
    the bf16 cache's block/warps/stages: the FP8 default, 64/4/3, was tuned when widening was slow)."""
    h, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rows = []
    for b in batch_sizes:
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
        lengths = torch.full((b,), context, device="cuda")
        shape = (b, hkv, context, d)
        row = {"batch": b, "context": context}
        row["bf16_us"] = _attention_us(q, lengths, shape, torch.bfloat16)
        row["fp8_us"] = _attention_us(q, lengths, shape, torch.float8_e4m3fn)
        blocks = dict(block_n=128, num_warps=4, num_stages=2)  # the bf16 cache's choice
        row["fp8_at_128_4_2_us"] = _attention_us(q, lengths, shape, torch.float8_e4m3fn, **blocks)
        rows.append(row)
        print("attention", json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--layers-8b", type=int, default=36, help="layers of the Qwen3-8B shape (all 36 by default)"
    )
    ap.add_argument("--shapes", nargs="+", choices=["0.6b", "8b"], default=["0.6b", "8b"])
    ap.add_argument(
        "--formats",
        nargs="+",
        choices=list(FORMATS),
        default=list(FORMATS),
        help="bf16 (the baseline) and these",
    )
    ap.add_argument("--skip-kernels", action="store_true", help="engine rows only (no GEMM/attention tables)")
    ap.add_argument("--skip-engine", action="store_true", help="the GEMM/attention tables only")
    ap.add_argument("--gemm-sweep", action="store_true", help="also time our GEMMs under other tilings")
    ap.add_argument("--sweep-shapes", nargs="+", choices=["0.6b", "8b"], default=["8b"])
    ap.add_argument(
        "--variants",
        nargs="*",
        choices=list(VARIANTS),
        help="also run the engine under VARIANTS' GEMM choices (these names; none: all)",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="engine rows this many times (runs 2.. in `repeats`)"
    )
    ap.add_argument(
        "--profile", action="store_true", help="GPU time by kernel for PROFILED's graphs (first run)"
    )
    ap.add_argument("--out", default="bench/results/precision_gpu.json")
    args = ap.parse_args()
    args.formats = ["bf16"] + [f for f in args.formats if f != "bf16"]
    if not torch.cuda.is_available():
        raise SystemExit("precision_gpu: needs a CUDA device")
    t0 = time.perf_counter()
    shapes = {}
    if "0.6b" in args.shapes:
        shapes["qwen3_0.6b"] = qwen3_06b()
    if "8b" in args.shapes:
        shapes[f"qwen3_8b_{args.layers_8b}_layers"] = qwen3_8b_slice(args.layers_8b)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "formats": {
            k: {"engine": kw, "int4_weights": int4} for k, (kw, int4) in FORMATS.items() if k in args.formats
        },
        "variants": {
            k: v
            for k, v in VARIANTS.items()
            if args.variants is not None and k in (args.variants or VARIANTS)
        },
        "plan": _plan_knobs(),
        "shapes": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part, so a run cut short keeps what it measured
        result["seconds"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(result, indent=2) + "\n")

    for name, config in shapes.items():
        if not args.skip_engine:
            bench_shape(name, config, args, result["shapes"].setdefault(name, {}), save, args.profile)
    if not args.skip_engine and args.repeats > 1:
        result["repeats"] = []
        for _ in range(args.repeats - 1):
            result["repeats"].append({})
            for name, config in shapes.items():
                bench_shape(name, config, args, result["repeats"][-1].setdefault(name, {}), save)
    if not args.skip_kernels:
        context = args.prompt_len + args.new_tokens // 2
        result["gemms"] = {name: gemm_table(config, args.batch_sizes) for name, config in shapes.items()}
        result["attention"] = attention_table(next(iter(shapes.values())), args.batch_sizes, context)
    if args.gemm_sweep:
        result["gemm_sweep"] = {
            name: gemm_sweep(config, args.batch_sizes)
            for name, config in shapes.items()
            if name.split("_")[1] in args.sweep_shapes
        }
    save()
    print(
        f"\n{'shape':<24} {'batch':>5} "
        + " ".join(f"{f:>12}" for f in args.formats)
        + "   (decode tokens/s; x bf16)"
    )
    for name, rows in result["shapes"].items():
        for b in args.batch_sizes:
            cells = []
            for f in args.formats:
                tps = rows[f][str(b)]["decode_tokens_per_s"]
                ratio = "" if f == "bf16" else f" {rows[f'{f}_over_bf16'][str(b)]:.2f}x"
                cells.append(f"{tps:>7.0f}{ratio:>6}" if ratio else f"{tps:>12.0f}")
            print(f"{name:<24} {b:>5} " + " ".join(cells))
    print(f"total {result['seconds']} s")


if __name__ == "__main__":
    main()
