"""How far the demo's warm start moves under tiny numerics changes (docs/benchmarks.md, "The demo").

    .venv/bin/python bench/warmstart_spread.py --variants base mbs64 noise order1 \
        --prep-root runs/ws --out bench/results/warmstart_spread.json
    .venv/bin/python -m slipstream demo --run-dir runs/ws/noise-live_g42   # RL from one of them

Each variant is the demo's SFT (`warmstart.sft_with_trainer`, seed-0 init and prompts) with one
small change:

    base    the demo's SFT as it is
    mbs64   --micro-batch-size 64: three micro-batches per step, the same loss summed in another order
    noise   every initial weight times (1 + 1e-7 N(0, 1)): a last-bit change
    orderN  the SFT's data order from seed N (the init unchanged)

From `--from-step` on, every step scores the check problems (the demo's 512) with the live weights
and with an EMA of them (`--ema`): greedy and sampled accuracy, mean answer log-prob, greedy on the
sums whose units carry and on the rest. The run goes on until every stop rule of RULES has fired
(`live_g42` is the demo's: the live weights' check greedy >= 0.42); each rule's warm start is then
scored on every held-out problem (what the demo's promise reads) and, with `--prep-root`, written
as a run directory that `slipstream demo --run-dir` trains from as it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from slipstream.demo.task import all_problems, sample_problems, write_prompts
from slipstream.demo.tokenizer import build_char_tokenizer
from slipstream.demo.warmstart import (
    WarmStartConfig,
    answer_logprobs,
    encode_problems,
    model_config,
    sft_with_trainer,
)
from slipstream.models.hf import init_model, save_model


def carry_mask(problems) -> torch.Tensor:
    ab = [p.prompt[:-1].split("+") for p in problems]
    return torch.tensor([int(a) % 10 + int(b) % 10 >= 10 for a, b in ab])


@torch.no_grad()
def measure(model, enc, carry) -> dict[str, float]:
    model.eval()
    lp, is_max = answer_logprobs(model, enc)
    model.train()
    g = is_max.all(-1).float()
    return dict(
        greedy=g.mean().item(),
        sampled=lp.sum(-1).exp().mean().item(),
        logp=lp.sum(-1).mean().item(),
        greedy_carry=g[carry].mean().item(),
        greedy_nocarry=g[~carry].mean().item(),
    )


# Stop rules replayed on the rows: (name, weights, metric, threshold); "live" is the current rule.
RULES = [
    ("live_g42", "check", "greedy", 0.42),
    ("ema_g40", "ema_check", "greedy", 0.40),
    ("ema_g42", "ema_check", "greedy", 0.42),
    ("ema_g45", "ema_check", "greedy", 0.45),
    ("ema_s25", "ema_check", "sampled", 0.25),
]


def run(variant: str, a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    cfg = WarmStartConfig(micro_batch_size=64 if variant == "mbs64" else 0)
    work = Path(tempfile.mkdtemp(prefix=f"ws_{variant}_"))
    tokenizer = build_char_tokenizer(work / "tok")
    model = init_model(model_config(cfg, tokenizer), 0)
    vocab = model.config.vocab_size
    seed = 0
    if variant == "noise":
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=gen))
    elif variant.startswith("order"):
        seed = int(variant.removeprefix("order"))
    elif variant not in ("base", "mbs64"):
        raise SystemExit(f"unknown variant {variant!r}")
    check_p = sample_problems(cfg.num_check, 0, split="train")
    held_p = all_problems("eval")
    check, held = encode_problems(tokenizer, check_p, vocab), encode_problems(tokenizer, held_p, vocab)
    check_c, held_c = carry_mask(check_p), carry_mask(held_p)
    rows: list[dict] = []
    shadow = copy.deepcopy(model)  # holds the EMA weights, or a snapshot being measured
    ema = [p.detach().clone() for p in shadow.parameters()]
    snaps: dict[tuple[str, int], list[torch.Tensor]] = {}
    stops: dict[str, int] = {}

    def watch(step: int, m) -> bool:
        live = [p.detach() for p in m.parameters()]
        with torch.no_grad():
            for e, p in zip(ema, live, strict=True):
                e.mul_(a.ema).add_(p, alpha=1 - a.ema)
        if step < a.from_step:
            return False
        with torch.no_grad():
            for s_, e in zip(shadow.parameters(), ema, strict=True):
                s_.copy_(e)
        row = {
            "step": step,
            "check": measure(m, check, check_c),
            "ema_check": measure(shadow, check, check_c),
        }
        rows.append(row)
        print(variant, json.dumps(row), flush=True)
        for name, weights, metric, threshold in RULES:
            if name not in stops and row[weights][metric] >= threshold:
                stops[name] = step
                snaps[(weights, step)] = [t.clone() for t in (live if weights == "check" else ema)]
        return len(stops) == len(RULES) or step >= a.steps

    t0 = time.perf_counter()
    # No check: the LR schedule spans sft_steps (800) as in the demo; `watch` ends the run.
    sft_with_trainer(
        model, work / "tok", all_problems("train"), cfg, seed, work / "sft",
        check=None, log=lambda *_: None, watch=watch,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    results = {}
    for name, weights, _, _ in RULES:
        if name not in stops:
            results[name] = None
            continue
        step = stops[name]
        with torch.no_grad():
            for s_, t in zip(shadow.parameters(), snaps[(weights, step)], strict=True):
                s_.copy_(t)
        row = next(r for r in rows if r["step"] == step)
        results[name] = {"step": step, "check": row[weights], "held_out": measure(shadow, held, held_c)}
        print(variant, name, json.dumps(results[name]), flush=True)
        if a.prep_root:  # a run directory `slipstream demo --run-dir` starts from as it is
            prep = Path(a.prep_root) / f"{variant}-{name}" / "prep"
            save_model(shadow, prep / "model")
            for f in (work / "tok").iterdir():
                if f.is_file() and f.name not in ("config.json", "model.safetensors"):
                    shutil.copy2(f, prep / "model" / f.name)
            write_prompts(prep / "train.jsonl", cfg.num_train_prompts, 0, split="train")
            write_prompts(prep / "eval.jsonl", cfg.num_eval_prompts, 0, split="eval")
    return {"variant": variant, "seconds": round(seconds, 1), "stops": results, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["base", "mbs64", "noise", "order1"])
    ap.add_argument("--steps", type=int, default=450, help="the most SFT steps (every rule stops it sooner)")
    ap.add_argument("--from-step", type=int, default=250, help="the first step measured")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ema", type=float, default=0.95, help="the decay of the weights' EMA")
    ap.add_argument("--prep-root", help="write each rule's warm start as ROOT/VARIANT-RULE/prep")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = [run(v, a) for v in a.variants]
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
