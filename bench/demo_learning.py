"""Why a demo run learned as fast as it did: how far RL moved each weight, how large AdamW's steps
were, and (MoE) how much of the routing changed, from a finished demo run directory.

    .venv/bin/python bench/demo_learning.py runs/demo-moe [runs/demo ...] [--out bench/results/X.json]

Per run, between the warm start (`prep/model`) and the last checkpoint:
- `rel_change`: |W_last - W_start| / |W_start| of every attention and MLP/expert/router weight;
- `adam_step`: mean over a tensor's entries of |m| / sqrt(v), AdamW's step in units of the lr at
  the last step (1 = every entry moves a full lr per step, consistently in one direction; pure
  noise in the gradient averages m towards 0): a tensor whose gradient is noisier moves less;
- `routing_unchanged` (MoE): per MoE layer, the share of (held-out problem position) whose
  top-k expert set is the same under both checkpoints (1 = the router did not move anything);
- `held_out_greedy_before` / `_after` and the sampled accuracy on the training prompts over the
  first and last 5 steps from the run's summary.json; the warm start's SFT steps and accuracies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

WATCHED = ("self_attn.q_proj", "self_attn.v_proj", "mlp.")


def _routing(model, input_ids: torch.Tensor) -> torch.Tensor:
    from slipstream.models.moe import Routing

    r = Routing()
    with torch.no_grad():
        model(input_ids, routing=r)
    return r.stacked().sort(-1).values  # [N, T, layers, k] as sets


def measure(run_dir: Path, num_problems: int = 500) -> dict:
    from transformers import AutoTokenizer

    from slipstream.demo.task import all_problems
    from slipstream.demo.warmstart import encode_problems
    from slipstream.models.hf import load_model

    start_dir = run_dir / "prep" / "model"
    last_dir = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    start, last = load_model(start_dir, dtype=torch.float32), load_model(last_dir, dtype=torch.float32)
    out: dict = {"run_dir": str(run_dir), "last_checkpoint": last_dir.name}
    mc, train = start.config, json.loads((run_dir / "config.json").read_text())["train"]
    out["model"] = {"num_parameters": sum(p.numel() for p in start.parameters())}
    if mc.num_experts:
        out["model"].update(
            num_experts=mc.num_experts,
            top_k=mc.num_experts_per_tok,
            moe_intermediate_size=mc.moe_intermediate_size,
        )
    out["train"] = {
        k: train[k] for k in ("lr", "moe_aux_loss_coeff", "use_rollout_routing_replay") if k in train
    }
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        keys = (
            "held_out_greedy_before",
            "held_out_greedy_after",
            "accuracy_first5",
            "accuracy_last5",
            "elapsed_s",
        )
        out.update({k: s.get(k) for k in keys})
    warm = json.loads((start_dir / "warmstart.json").read_text())
    out["warm_start"] = {"sft_steps": warm["sft_steps"], **warm["eval_after_sft"]}
    ends = dict(last.named_parameters())
    out["rel_change"] = {  # None: the weight started at zero (a router cut from a dense model)
        n: round(((ends[n] - p).norm() / p.norm()).item(), 4) if p.any() else None
        for n, p in start.named_parameters()
        if any(w in n for w in WATCHED)
    }
    optim = load_file(str(last_dir / "optimizer" / "optimizer.safetensors"))
    out["adam_step"] = {
        n: round((optim[f"{n}::exp_avg"].abs() / (optim[f"{n}::exp_avg_sq"].sqrt() + 1e-8)).mean().item(), 3)
        for n in out["rel_change"]
        if f"{n}::exp_avg" in optim
    }
    if mc.num_experts:
        tok = AutoTokenizer.from_pretrained(start_dir)
        enc = encode_problems(tok, all_problems("eval")[:num_problems], start.config.vocab_size)
        real = enc.input_ids != tok.pad_token_id
        same = (_routing(start, enc.input_ids) == _routing(last, enc.input_ids)).all(-1)  # [N, T, layers]
        out["routing_unchanged"] = [
            round(same[..., i][real].float().mean().item(), 3) for i in range(same.shape[-1])
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="Finished demo run directories.")
    parser.add_argument("--out", type=Path, help="Also write the JSON here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = [measure(d) for d in args.run_dirs]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
