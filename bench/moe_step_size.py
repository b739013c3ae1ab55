"""How far one optimizer step moves each layer, dense against MoE, on the same data (issue 15 item 6).

    .venv/bin/python bench/moe_step_size.py MODEL_DIR [MODEL_DIR ...] [--samples-from DIR] [--out X.json]

One batch of the demo's rollouts (64 train prompts x 8 samples at temperature 1, sampled by the
engine from `--samples-from`, default the first model, rewarded by exact match) trains each model
for `--steps` optimizer steps with the demo's trainer settings (lr 3e-4, GRPO, one step per
rollout batch, R3 off: the samples are not each model's own). After each step, on the batch's
sequences: per layer, |Δ attention output| / |attention output| and |Δ MLP output| / |MLP output|
(the MoE layer's output with the starting routing replayed, so only the weights' change counts),
and the mean |Δ log-prob| of the sampled response tokens. A mixture of k experts whose gates sum
to one moves its MLP output ~k times less per AdamW step than the dense MLP of the same active
width; `routed_scaling_factor` k makes them equal (models/moe.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def rollouts(model_dir: Path, prompts: int, n: int, seed: int = 0) -> list:
    from slipstream.data import encode_prompt
    from slipstream.demo.task import sample_problems
    from slipstream.models.hf import load_model, load_tokenizer
    from slipstream.services.rollout.engine import NativeEngine, Request
    from slipstream.types import Sample, Status

    tok = load_tokenizer(model_dir)
    engine = NativeEngine(load_model(model_dir), eos_token_ids=[tok.eos_token_id], seed=seed)
    problems = sample_problems(prompts, seed, split="train")
    reqs = [
        Request(
            f"{i}/{j}", encode_prompt(tok, p.prompt, apply_chat_template=False), 8, seed=seed + 1000 * i + j
        )
        for i, p in enumerate(problems)
        for j in range(n)
    ]
    out = []
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        label = problems[int(req.rid.split("/")[0])].label
        text = tok.decode([t for t in res.tokens if t != tok.eos_token_id])
        out.append(
            Sample(
                tokens=req.tokens + res.tokens, response_length=len(res.tokens), reward=float(text == label),
                status=Status.COMPLETED, policy_versions=[0] * len(res.tokens), rollout_log_probs=res.log_probs,
            )
        )  # fmt: skip
    return out


def measure(model, samples: list, replay: list | None = None) -> dict:
    """Every layer's attention and MLP output on the samples' sequences (right-padded, one batch;
    an MoE layer's with the experts in `replay` if given, else its own, captured) and the
    sampled tokens' log-probs."""
    from slipstream.models.moe import Routing
    from slipstream.services.trainer.batch import collate

    batch = collate(samples, [0.0] * len(samples))
    attn, mlp = [], []
    hooks = [
        layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: attn.append(o))
        for layer in model.model.layers
    ]
    hooks += [layer.mlp.register_forward_hook(lambda m, a, o: mlp.append(o)) for layer in model.model.layers]
    routing = Routing(replay=replay) if model.config.num_experts else None
    with torch.no_grad():
        logits = model(batch.input_ids, routing=routing)
    for h in hooks:
        h.remove()
    return {
        "attn": attn,
        "mlp": mlp,
        "lp": logits.log_softmax(-1).gather(-1, batch.targets[..., None])[..., 0],
        "mask": batch.loss_mask > 0,
        "real": torch.arange(batch.input_ids.shape[1])[None, :] < batch.seq_lens[:, None],
        "experts": None if routing is None else list(routing.experts),
    }


def run(model_dir: Path, samples: list, steps: int, lr: float) -> dict:
    from slipstream.algorithms.advantages import group_scores
    from slipstream.config import config_from_values
    from slipstream.services.trainer.actor import Actor

    torch.manual_seed(0)
    n = 8
    flags = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=len(samples) // n, n_samples_per_prompt=n,
        lr=lr, device="cpu", rollout_max_response_len=8, rm_type="math", use_tis=False,
    )  # fmt: skip
    actor = Actor.from_config(config_from_values(flags))
    rewards = torch.tensor([s.reward for s in samples]).view(-1, n)
    scores = group_scores(rewards, "grpo").reshape(-1).tolist()
    model = actor.model
    model.eval()
    start = measure(model, samples)
    out = {"model": str(model_dir), "num_experts": model.config.num_experts}
    if model.config.num_experts:
        out.update(
            top_k=model.config.num_experts_per_tok, routed_scaling_factor=model.config.routed_scaling_factor
        )
    real = start["real"]
    per_step = []
    for step in range(steps):
        model.train()
        actor.train_rollout(samples, scores)
        model.eval()
        now = measure(model, samples, start["experts"])

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return round(((b - a)[real].norm() / a[real].norm()).item(), 5)

        per_step.append(
            {
                "step": step + 1,
                "attn_rel_change": [rel(a, b) for a, b in zip(start["attn"], now["attn"], strict=True)],
                "mlp_rel_change": [rel(a, b) for a, b in zip(start["mlp"], now["mlp"], strict=True)],
                "logprob_abs_change": round((now["lp"] - start["lp"])[start["mask"]].abs().mean().item(), 5),
            }
        )
    out["steps"] = per_step
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="Checkpoint directories (dense or MoE).")
    parser.add_argument(
        "--samples-from", type=Path, help="The model that samples the batch (default: the first)."
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    samples = rollouts(args.samples_from or args.models[0], args.prompts, 8)
    report = {
        "samples_from": str(args.samples_from or args.models[0]),
        "num_samples": len(samples),
        "mean_reward": sum(s.reward for s in samples) / len(samples),
        "runs": [run(m, samples, args.steps, args.lr) for m in args.models],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
