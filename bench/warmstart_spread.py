"""How far the demo's warm start moves under tiny numerics changes (docs/benchmarks.md, "The demo").

    .venv/bin/python bench/warmstart_spread.py --variants base mbs64 noise order1 --out X.json

Each variant is the demo's SFT (`warmstart.sft_with_trainer`, seed-0 init and prompts) with one
small change, run without stopping to `--steps`; from `--from-step` on, every step records the
check problems' and the held-out problems' greedy and sampled accuracy, mean answer log-prob and
greedy accuracy on the sums whose units carry, so any stop rule can be replayed on the rows:

    base    the demo's SFT as it is
    mbs64   --micro-batch-size 64: three micro-batches per step, the same loss summed in another order
    noise   every initial weight times (1 + 1e-7 N(0, 1)): a last-bit change
    orderN  the SFT's data order from seed N (the init unchanged)
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from slipstream.demo.task import all_problems, sample_problems
from slipstream.demo.tokenizer import build_char_tokenizer
from slipstream.demo.warmstart import (
    WarmStartConfig,
    answer_logprobs,
    encode_problems,
    model_config,
    sft_with_trainer,
)
from slipstream.models.hf import init_model


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


def run(variant: str, steps: int, from_step: int, threads: int, ema_decay: float, live_held: bool) -> dict:
    torch.set_num_threads(threads)
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
    ema_model, ema = None, None

    def watch(step: int, m) -> bool:
        nonlocal ema_model, ema
        if ema_decay:
            with torch.no_grad():
                live = [p.detach() for p in m.parameters()]
                if ema is None:
                    ema_model = copy.deepcopy(m)
                    ema = list(ema_model.parameters())
                for e, p in zip(ema, live, strict=True):
                    e.mul_(ema_decay).add_(p, alpha=1 - ema_decay)
        if step < from_step and step % 10:
            return False
        row = {"step": step, "check": measure(m, check, check_c)}
        if step >= from_step:
            row["held_out"] = measure(m, held, held_c) if not ema_decay or live_held else None
            if ema_decay:
                row["ema_check"] = measure(ema_model, check, check_c)
                row["ema_held_out"] = measure(ema_model, held, held_c)
        rows.append(row)
        print(variant, json.dumps(row), flush=True)
        return step >= steps

    t0 = time.perf_counter()
    # No check: the LR schedule spans sft_steps (800) as in the demo; `watch` ends the run at `steps`.
    sft_with_trainer(
        model, work / "tok", all_problems("train"), cfg, seed, work / "sft",
        check=None, log=lambda *_: None, watch=watch,
    )  # fmt: skip
    return {"variant": variant, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["base", "mbs64", "noise", "order1"])
    ap.add_argument("--steps", type=int, default=330)
    ap.add_argument("--from-step", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ema", type=float, default=0.0, help="also an EMA of the weights with this decay")
    ap.add_argument("--live-held", action="store_true", help="with --ema, the live weights' held-out too")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = [run(v, a.steps, a.from_step, a.threads, a.ema, a.live_held) for v in a.variants]
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
