"""One end-to-end GRPO step on one GPU: ours next to TRL's `GRPOTrainer`, same model and config.

    python bench/grpo_step_gpu.py [--prompts 32] [--n 8] [--prompt-len 128] [--new-tokens 256]
                                  [--skip-trl] [--out bench/results/grpo_step_gpu.json]

Qwen3-0.6B shape, random init, bf16, --prompts distinct random prompts of --prompt-len tokens,
--n samples each of exactly --new-tokens tokens (temperature 1, EOS never sampled on purpose
by either side: the work is the same), a rule reward (the share of even token ids in the
completion), lr 1e-6, one optimizer step over all samples, no KL term.

Ours, in one process: the native engine generates all samples (`NativeEngine`, CUDA graphs,
one prefill per group), the reward, GRPO advantages, `Actor.train_rollout` (`--bf16`, packed
micro-batches of --max-tokens-per-gpu tokens, proximal log-probs recomputed), and the weight
update into the engine (`Actor.state_dict_for_sync` -> `NativeEngine.load_weights`, in place on
the GPU). Each part is timed (synchronized); the step is the median of --steps after a warm-up.

TRL: `GRPOTrainer` with transformers generation (no vLLM), per-device batch 32 x 8 gradient
accumulation steps = one generation of all samples and one optimizer step, bf16 weights; two
steps run and the second (warm) is reported, with the first beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_gpu import prompts, qwen3_06b, random_model  # noqa: E402

from slipstream.algorithms.advantages import group_scores  # noqa: E402
from slipstream.config import parse_config  # noqa: E402
from slipstream.models.hf import save_model  # noqa: E402
from slipstream.types import Sample, Status  # noqa: E402


def reward(tokens: list[int]) -> float:
    return sum(1 for t in tokens if t % 2 == 0) / max(len(tokens), 1)


def _sync_time(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench_ours(args, model_dir: str) -> dict:
    import copy

    from slipstream.services.rollout.engine import NativeEngine, Request
    from slipstream.services.trainer.actor import Actor

    cfg = parse_config([
        "--hf-checkpoint", model_dir, "--dtype", "bfloat16", "--bf16", "--rollout-batch-size", str(args.prompts),
        "--n-samples-per-prompt", str(args.n), "--lr", "1e-6", "--rollout-max-response-len", str(args.new_tokens),
        "--use-dynamic-batch-size", "--max-tokens-per-gpu", str(args.max_tokens_per_gpu),
        *(["--torch-compile"] if args.compile else []),
    ])  # fmt: skip
    actor = Actor.from_config(cfg)
    engine_model = copy.deepcopy(actor.model).to(torch.bfloat16).eval().requires_grad_(False)
    engine = NativeEngine(
        engine_model, eos_token_ids=[], max_batch_size=args.prompts * args.n,
        max_seq_len=args.prompt_len + args.new_tokens, kv_memory_fraction=0.3,
    )  # fmt: skip
    vocab = engine_model.config.vocab_size
    steps = []
    for step in range(args.steps + 1):
        ps = prompts(args.prompts, args.prompt_len, vocab, seed=100 + step)
        reqs = [
            Request(
                f"{step}-{g}-{j}", p, args.new_tokens, temperature=1.0, seed=step * 100000 + g * args.n + j
            )
            for g, p in enumerate(ps)
            for j in range(args.n)
        ]
        t_start = time.perf_counter()
        results, t_gen = _sync_time(lambda reqs=reqs: engine.generate(reqs))
        t0 = time.perf_counter()
        rewards = torch.tensor([reward(r.tokens) for r in results]).view(args.prompts, args.n)
        scores = group_scores(rewards, "grpo").view(-1).tolist()
        samples = [
            Sample(tokens=req.tokens + r.tokens, response_length=len(r.tokens), status=Status.COMPLETED,
                   reward=float(rw), rollout_log_probs=r.log_probs, policy_versions=r.versions)
            for req, r, rw in zip(reqs, results, rewards.view(-1).tolist(), strict=True)
        ]  # fmt: skip
        t_reward = time.perf_counter() - t0
        stats, t_train = _sync_time(
            lambda samples=samples, scores=scores, step=step: actor.train_rollout(samples, scores, step)
        )
        _, t_sync = _sync_time(
            lambda step=step: engine.load_weights(actor.state_dict_for_sync(), version=step + 1)
        )
        total = time.perf_counter() - t_start
        row = {
            "generate_s": round(t_gen, 3), "reward_s": round(t_reward, 4), "train_s": round(t_train, 3),
            "weight_update_s": round(t_sync, 4), "total_s": round(total, 3), "loss": stats.loss,
            "logprob_abs_diff_mean": stats.logprob_abs_diff_mean, "metrics": stats.metrics, "generated_tokens": sum(len(r.tokens) for r in results),
        }  # fmt: skip
        print("ours", "warm-up" if step == 0 else f"step {step}", json.dumps(row), flush=True)
        if step:
            steps.append(row)
    med = sorted(steps, key=lambda r: r["total_s"])[len(steps) // 2]
    engine.cache = None  # free the KV cache before TRL runs
    return {"median_step": med, "steps": steps}


def bench_trl(args, model: torch.nn.Module) -> dict:
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from transformers import Qwen3Config as HFConfig
    from trl import GRPOConfig, GRPOTrainer

    vocab = model.config.vocab_size
    # A word-level tokenizer over the whole vocabulary: "t17 t4093 ..." is exactly those ids.
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t151645")
    tokenizer.padding_side = "left"
    hf_cfg = HFConfig(**{k: v for k, v in model.config.to_hf_dict().items() if k != "architectures"})
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    n_prompts = args.prompts * 3  # two steps plus slack
    ds = Dataset.from_dict(
        {"prompt": [" ".join(f"t{t}" for t in p) for p in prompts(n_prompts, args.prompt_len, vocab, seed=7)]}
    )

    def even_share(completions, **kwargs):
        return [reward([int(w[1:]) for w in c.split()]) for c in completions]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            print("trl step", len(times), round(times[-1], 2), flush=True)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.prompts, gradient_accumulation_steps=args.n,
            num_generations=args.n, max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0,
            learning_rate=1e-6, beta=0.0, max_steps=2, logging_steps=1, save_strategy="no", report_to=[],
            bf16=True, use_vllm=False, seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=hf, reward_funcs=even_share, args=config, train_dataset=ds, processing_class=tokenizer,
            callbacks=[StepTimer()],
        )  # fmt: skip
        trainer.train()
    return {"step_s": times[-1], "steps_s": [round(t, 3) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=16384)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--trl-reference-s", type=float, default=27.9, help="issue 6's measured TRL step")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "grpo_step_gpu.json")
    args = parser.parse_args()
    model = random_model(qwen3_06b())
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        ours = bench_ours(args, d)
    result = {
        "bench": "grpo_step_gpu", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "out"}, "ours": ours,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")  # ours lands even if TRL hangs
    if not args.skip_trl:
        try:
            result["trl"] = bench_trl(args, model)
        except Exception as e:  # recorded, so our figures still land
            result["trl"] = {"error": f"{type(e).__name__}: {e}"[:3000]}
    ref = result.get("trl", {}).get("step_s") or args.trl_reference_s
    result["speedup_vs_trl"] = round(ref / ours["median_step"]["total_s"], 2)
    result["trl_figure_used"] = (
        "measured in this run" if result.get("trl", {}).get("step_s") else "issue 6 (27.9 s)"
    )
    print(
        json.dumps({k: result[k] for k in ("speedup_vs_trl", "trl_figure_used")}),
        json.dumps(ours["median_step"]),
    )
    print("trl:", json.dumps(result.get("trl")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
