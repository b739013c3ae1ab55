"""Qwen3-30B-A3B's shape with 8 of its 48 layers on one GPU: engine decode, trainer step, R3.

    sh scripts/gpu_env.sh run python3 bench/moe_gpu.py --out bench/results/moe_gpu.json

The model: hidden 2048, 32 heads / 4 KV heads of 128, 128 experts of width 768, top-8 renormalised,
untied 151936 vocabulary, every layer sparse; 8 layers (5.6 B parameters, 0.76 B active a token),
random init, bf16. In one run:

1. engine (ours): tokens/s at --batch-sizes, each sequence sampling exactly --new-tokens at
   temperature 1 from a distinct random --prompt-len prompt (best of two timed runs after a
   warm-up that captures the CUDA graphs; the experts run as grouped GEMMs, `kernels/moe.py`:
   torch._grouped_mm, or each of --expert-kernels side by side; --expert-sweep first times one
   layer's experts at each Triton tiling against torch._grouped_mm),
   next to transformers' `generate` on the same weights (its run capped at --hf-new-tokens
   tokens, so the script stays short; tokens/s is a rate either way) and a roofline: the bytes
   one decode step must read at --hbm-tbps (attention, norms, routers and LM head, plus the
   experts the batch touches: E x (1 - (1 - k/E)^batch) a layer expected for uniform routing,
   plus the KV cache at the mean context);
2. R3 on that shape: the engine's samples (its log-probs and routed experts) scored by the
   trainer's bf16 forward with and without rollout routing replay: mean/max |log-prob
   difference| and routing agreement (share of token-layers whose trainer top-k equals the
   rollout's; with replay the experts used equal them by construction);
3. trainer: `Actor.train_rollout` (--bf16, proximal recompute, GRPO PPO loss, AdamW on fp32 masters,
   R3 on) on those samples, tokens/s and MFU on active parameters (6 x active x tokens against
   --peak-tflops).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from slipstream.models import ModelConfig, Qwen3ForCausalLM


def qwen3_30b_a3b_slice(layers: int) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        rope_theta=1_000_000.0, max_position_embeddings=40960, tie_word_embeddings=False,
        eos_token_id=151645,
    )  # fmt: skip


def random_model(config: ModelConfig, seed: int = 0, device: str = "cuda") -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model.eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def bench_ours(model, batch: int, args, fp8: bool = False, kernel: str = "grouped_mm") -> tuple[dict, list]:
    """`fp8`: the engine's FP8 (--rollout-fp8 on a copy of the model: attention and router GEMMs in
    e4m3, the experts dequantized to bf16 as an FP8 version brings them; --kv-cache-dtype fp8_e4m3).
    `kernel`: the experts' grouped GEMM (`runner.MOE_EXPERT_KERNEL`)."""
    from slipstream.services.rollout.engine import NativeEngine, Request, runner

    runner.MOE_EXPERT_KERNEL = kernel  # read when the engine is built

    engine = NativeEngine(
        copy.deepcopy(model) if fp8 else model, eos_token_ids=[], max_batch_size=batch,
        max_seq_len=args.prompt_len + args.new_tokens, fp8=fp8, kv_cache_dtype="fp8_e4m3" if fp8 else "auto",
    )  # fmt: skip
    best, results = float("inf"), []
    for r in range(3):
        reqs = [
            Request(f"{r}-{i}", p, args.new_tokens, temperature=1.0, seed=i)
            for i, p in enumerate(prompts(batch, args.prompt_len, model.config.vocab_size, r))
        ]
        sync()
        t0 = time.perf_counter()
        results = engine.generate(reqs)
        sync()
        if r:
            best = min(best, time.perf_counter() - t0)
    row = {
        "tokens_per_s": batch * args.new_tokens / best,
        "seconds": best,
        "graphs_captured": len(engine.graphs.graphs) if engine.graphs else 0,
    }
    del engine
    return row, results


SWEEP_BLOCKS = [(64, 64, 64, 4), (32, 64, 64, 4), (16, 64, 64, 4), (64, 128, 64, 4), (64, 128, 64, 8),
                (32, 128, 64, 4), (16, 128, 64, 4), (64, 64, 128, 4), (32, 64, 128, 4), (16, 64, 128, 4),
                (64, 32, 64, 4), (16, 32, 128, 4)]  # fmt: skip


def expert_sweep(config: ModelConfig, batch_sizes: list[int]) -> list[dict]:
    """One MoE layer's experts (`kernels.moe.grouped_experts`, routing uniform at random) at each
    batch: microseconds a call replayed from a CUDA graph of 20 calls, torch._grouped_mm against the
    Triton grouped GEMM at each tiling of SWEEP_BLOCKS."""
    from slipstream.kernels import invariant_gpu, moe

    e, k, h, i = (
        config.num_experts,
        config.num_experts_per_tok,
        config.hidden_size,
        config.moe_intermediate_size,
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    gate_up = 0.02 * torch.randn(e, 2 * i, h, device="cuda", generator=g, dtype=torch.bfloat16)
    down = 0.02 * torch.randn(e, h, i, device="cuda", generator=g, dtype=torch.bfloat16)
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, h, device="cuda", generator=g, dtype=torch.bfloat16)
        ids = torch.rand(batch, e, device="cuda", generator=g).topk(k, dim=-1).indices
        weights = torch.rand(batch, k, device="cuda", generator=g).softmax(-1).bfloat16()
        want = moe.grouped_experts(x, ids, weights, gate_up, down)
        for blocks in [None, *SWEEP_BLOCKS]:
            if blocks is not None:
                moe.TRITON_BLOCKS = invariant_gpu.Blocks(*blocks)

            def call(x=x, ids=ids, weights=weights, kernel="grouped_mm" if blocks is None else "triton"):
                return moe.grouped_experts(x, ids, weights, gate_up, down, kernel)

            got = call()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                call()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    call()
            graph.replay()
            sync()
            t0 = time.perf_counter()
            for _ in range(10):
                graph.replay()
            sync()
            us = (time.perf_counter() - t0) / 200 * 1e6
            rows.append({
                "batch": batch, "kernel": "grouped_mm" if blocks is None else "triton", "blocks": blocks,
                "us": round(us, 2), "max_abs_diff_vs_grouped_mm": float((got.float() - want.float()).abs().max()),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_hf(model, batch: int, args) -> dict:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    hf_cfg = Qwen3MoeConfig(**{k: v for k, v in model.config.to_hf_dict().items() if k != "architectures"})
    device = model.lm_head.weight.device
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    n = args.hf_new_tokens

    def run(b, new):
        ids = torch.tensor(prompts(b, args.prompt_len, model.config.vocab_size, 9), device=device)
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                top_p=1.0, top_k=0, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        sync()
        return out

    run(batch, 2)  # warm-up
    t0 = time.perf_counter()
    out = run(batch, n)
    dt = time.perf_counter() - t0
    assert out.shape[1] == args.prompt_len + n
    return {
        "tokens_per_s": batch * n / dt,
        "seconds": dt,
        "new_tokens": n,
        "weights_not_loaded": len(missing),
        "unexpected_weights": len(unexpected),
    }


def weight_bytes(model) -> dict:
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.model.embed_tokens.weight
    other = sum(p.numel() * p.element_size() for p in model.parameters()) - experts - embed.numel() * 2
    return {"experts": experts, "other_read_per_step": other}


def roofline(config: ModelConfig, batch: int, args, wb: dict) -> dict:
    e, k, layers = config.num_experts, config.num_experts_per_tok, len(config.moe_layers)
    touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts a layer, uniform routing
    expert_bytes = wb["experts"] / (e * layers)
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    mean_context = args.prompt_len + args.new_tokens / 2
    step_bytes = (
        wb["other_read_per_step"] + layers * touched * expert_bytes + batch * mean_context * kv_per_token
    )
    step_s = step_bytes / (args.hbm_tbps * 1e12)
    return {
        "tokens_per_s": batch / step_s,
        "step_ms": 1e3 * step_s,
        "step_gb": step_bytes / 1e9,
        "experts_touched_per_layer": touched,
    }


def samples_from(results, reqs_prompts) -> list:
    from slipstream.types import Sample, Status

    out = []
    for i, (res, prompt) in enumerate(zip(results, reqs_prompts, strict=True)):
        tokens = prompt + res.tokens
        out.append(
            Sample(
                tokens=tokens,
                response_length=len(res.tokens),
                status=Status.COMPLETED,
                reward=float(i % 2),
                rollout_log_probs=res.log_probs,
                policy_versions=[0] * len(res.tokens),
                rollout_routed_experts=res.routed_experts.long().tolist(),
                index=i,
            )  # fmt: skip
        )
    return out


def r3_and_trainer(model_dir: Path, samples: list, args) -> dict:
    from slipstream.algorithms.losses import chunked_token_log_probs
    from slipstream.config import parse_config
    from slipstream.services.trainer.actor import Actor
    from slipstream.services.trainer.batch import collate

    n = len(samples)
    cfg = parse_config(
        [
            "--hf-checkpoint",
            str(model_dir),
            "--dtype",
            "bfloat16",
            "--bf16",
            "--device",
            args.device,
            "--rollout-batch-size",
            str(n),
            "--n-samples-per-prompt",
            "1",
            "--micro-batch-size",
            str(args.micro_batch_size),
            "--rollout-max-response-len",
            str(args.new_tokens),
            "--use-rollout-routing-replay",
            "--lr",
            "1e-6",
        ]  # fmt: skip
    )
    actor = Actor.from_config(cfg)
    out: dict = {}
    batch = collate(samples[: args.micro_batch_size], [0.0] * args.micro_batch_size).to(actor.device)
    trained = batch.loss_mask > 0
    for replay in (False, True):
        actor.moe.rollout_replay = replay
        routing = actor.moe.routing(batch, training=False)
        with torch.no_grad():
            lp = actor._forward(actor.compute, batch, chunked_token_log_probs, routing)
        diff = (lp - batch.rollout_log_probs).abs()[trained]
        recorded = actor.moe._frame(batch)
        chosen = routing.stacked() if not replay else torch.stack(routing.chosen, dim=-2)
        real = actor.moe._real_positions(batch)[..., None].expand(recorded.shape[:-1])
        same = (chosen.sort(-1).values == recorded.long().sort(-1).values).all(-1)
        used = routing.stacked()
        used_same = (used.sort(-1).values == recorded.long().sort(-1).values).all(-1)
        out["r3" if replay else "no_replay"] = {
            "mean_abs_logprob_diff": float(diff.mean()),
            "max_abs_logprob_diff": float(diff.max()),
            "router_agreement": float(same[real].float().mean()),
            "routing_agreement": float(used_same[real].float().mean()),
        }
    actor.moe.rollout_replay = True
    scores = [1.0 if i % 2 else -1.0 for i in range(n)]
    actor.train_rollout(samples, scores)  # warm-up (allocations, cuBLAS plans)
    sync()
    t0 = time.perf_counter()
    stats = actor.train_rollout(samples, scores)
    sync()
    dt = time.perf_counter() - t0
    tokens = sum(len(s.tokens) - 1 for s in samples)
    c = actor.model.config
    active = (
        sum(
            p.numel()
            for name, p in actor.model.named_parameters()
            if ".experts." not in name and "embed" not in name
        )
        + len(c.moe_layers) * c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size
    )
    out["trainer"] = {
        "samples": n,
        "tokens": tokens,
        "seconds": dt,
        "tokens_per_s": tokens / dt,
        "active_params": active,
        "mfu_active": 6 * active * tokens / dt / (args.peak_tflops * 1e12),
        "moe_routing_agreement": stats.metrics.get("moe_routing_agreement"),
        "moe_router_agreement": stats.metrics.get("moe_router_agreement"),
        "logprob_abs_diff_mean": stats.logprob_abs_diff_mean,
        "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-new-tokens", type=int, default=32)
    ap.add_argument("--hbm-tbps", type=float, default=4.3)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--train-samples", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--fp8", action="store_true", help="also the engine's FP8 (weights and KV cache)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument(
        "--expert-kernels", nargs="+", default=["grouped_mm"], choices=["triton", "grouped_mm"],
        help="the engine's grouped expert GEMM; the first is the table's, the others run beside it",
    )  # fmt: skip
    ap.add_argument(
        "--expert-sweep", action="store_true", help="first time one layer's experts at each tiling"
    )
    ap.add_argument(
        "--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test the script"
    )
    ap.add_argument("--out", default="bench/results/moe_gpu.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moe_gpu: needs a CUDA device")
    t_start = time.perf_counter()
    config = qwen3_30b_a3b_slice(args.layers)
    model = random_model(config, device=args.device)
    wb = weight_bytes(model)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": f"Qwen3-30B-A3B shape, {args.layers} of 48 layers, random init, bf16",
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": wb,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rows": [],
    }
    if args.expert_sweep:
        result["expert_sweep"] = expert_sweep(config, args.batch_sizes)
    train_results = None
    first, *others = args.expert_kernels
    result["expert_kernel"] = first
    for batch in args.batch_sizes:
        row = {"batch": batch, "roofline": roofline(config, batch, args, wb)}
        row["ours_bf16"], results = bench_ours(model, batch, args, kernel=first)
        for kernel in others:
            row[f"ours_bf16_{kernel}"], _ = bench_ours(model, batch, args, kernel=kernel)
            row[f"{first}_over_{kernel}"] = (
                row["ours_bf16"]["tokens_per_s"] / row[f"ours_bf16_{kernel}"]["tokens_per_s"]
            )
        if args.fp8:
            row["ours_fp8"], _ = bench_ours(model, batch, args, fp8=True, kernel=first)
            row["fp8_over_bf16"] = row["ours_fp8"]["tokens_per_s"] / row["ours_bf16"]["tokens_per_s"]
            gc.collect()
            torch.cuda.empty_cache()
        if batch == max(args.batch_sizes):
            train_results = (results, prompts(batch, args.prompt_len, config.vocab_size, 2))
        if not args.skip_hf:
            row["transformers"] = bench_hf(model, batch, args)
            row["ours_over_transformers"] = (
                row["ours_bf16"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
            )
        row["ours_over_roofline"] = row["ours_bf16"]["tokens_per_s"] / row["roofline"]["tokens_per_s"]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    if not args.skip_trainer and train_results is not None:
        results, ps = train_results
        samples = samples_from(results[: args.train_samples], ps[: args.train_samples])
        from slipstream.models.hf import save_model

        with tempfile.TemporaryDirectory() as d:
            save_model(model, Path(d))
            del model
            gc.collect()
            torch.cuda.empty_cache()
            result.update(r3_and_trainer(Path(d), samples, args))
        print(json.dumps({k: result[k] for k in ("no_replay", "r3", "trainer")}), flush=True)
    result["wall_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'batch':>5} {'ours':>9} {'hf':>8} {'roofline':>9} {'x hf':>6} {'%roof':>6}")
    for r in result["rows"]:
        hf = r.get("transformers", {}).get("tokens_per_s", 0)
        print(
            f"{r['batch']:>5} {r['ours_bf16']['tokens_per_s']:>9.0f} {hf:>8.0f} {r['roofline']['tokens_per_s']:>9.0f} "
            f"{r.get('ours_over_transformers', 0):>6.1f} {100 * r['ours_over_roofline']:>5.1f}%"
        )


if __name__ == "__main__":
    main()
