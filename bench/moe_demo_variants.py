"""The MoE demo's open question (docs/benchmarks.md, "The MoE demo"), as one command: is it
sparsity that slows its learning, or something else in the MoE path?

    CUDA_VISIBLE_DEVICES= sh scripts/gpu_env.sh run python3 bench/moe_demo_variants.py --parallel 3 \
        --out bench/results/moe_demo_variants.json

(any other flag goes to every `slipstream demo`, e.g. `--num-rollout 200`; `--only NAME ...`).

Each variant is `slipstream demo --moe` (its settings: 100 steps of 64 x 8, lr 3e-4, R3, seed 1234)
from its own warm start (the demo's `prepare_demo`, seed 0, stopped at greedy 0.30), an MoE of the
dense demo's active MLP size (768) split differently:

    top2of8   8 experts x 384, top-2   (the demo's; a second run of it)
    top4of8   8 experts x 192, top-4   (each expert sees half the tokens)
    top8of8   8 experts x 96,  top-8   (every expert sees every token: the MoE code path, R3
                                         included, without sparsity; should learn like the dense
                                         demo, 0.72-0.735, if sparsity is the cause)

and the gate's scale (`routed_scaling_factor`, models/moe.py: with renormalised gates a layer is
a convex combination of its k experts, so AdamW moves it ~k times less than a dense MLP):

    top2of8-scaled  8 x 384, top-2, routed_scaling_factor 2
    top4of8-scaled  8 x 192, top-4, routed_scaling_factor 4
    dense-2of2      the dense demo's own warm start cut into 2 experts x 384, top-2 of 2, zero
                    router (`warmstart.moe_of_dense`): the dense model's function exactly, as an
                    MoE whose gates are 1/2 (RL starts where the dense demo's does)
    dense-2of2-scaled  the same with routed_scaling_factor 2: the dense model's function, gradients
                    and AdamW steps (tests/test_moe_dense_equivalence.py)
    upcycled-2of4   sparse upcycling (`WarmStartConfig.upcycle`): the dense demo's SFT, then 4
                    experts x 768, each a copy of the dense MLP, top-2, random router: the dense
                    warm start's function exactly, sparse from the first RL step
    upcycled-2of8   the same with 8 experts
    dense-upcycled-2of4  upcycled-2of4 made from the `--dense-prep` warm start

The `dense-*` variants take the dense demo's warm start from `--dense-prep` (made there first,
the demo's way, if missing).

`--parallel N` runs N at once, for a machine with the cores (the GPU host's 16; CUDA hidden so
every service runs the CPU path the demo runs on); on the 2-core box run one at a time. Per
variant: the demo's summary (held-out greedy before/after, sampled accuracy first/last 5 steps),
its wall time, and `bench/demo_learning.py`'s measurement of the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = {  # name: (num_experts, num_experts_per_tok, moe_intermediate_size, routed_scaling_factor, upcycle)
    "top2of8": (8, 2, 384, 1.0, False),
    "top4of8": (8, 4, 192, 1.0, False),
    "top8of8": (8, 8, 96, 1.0, False),
    "top2of8-scaled": (8, 2, 384, 2.0, False),
    "top4of8-scaled": (8, 4, 192, 4.0, False),
    "dense-2of2": (2, 2, 384, 1.0, False),
    "dense-2of2-scaled": (2, 2, 384, 2.0, False),
    "dense-upcycled-2of4": (4, 2, 768, 1.0, True),
    "upcycled-2of4": (4, 2, 768, 1.0, True),
    "upcycled-2of8": (8, 2, 768, 1.0, True),
}
PREPARE = (
    "from slipstream.demo.warmstart import WarmStartConfig, prepare_demo; "
    "prepare_demo({prep!r}, seed=0, cfg=WarmStartConfig(num_experts={e}, num_experts_per_tok={k}, "
    "moe_intermediate_size={i}, routed_scaling_factor={s}, upcycle={u}), log=print)"
)
PREPARE_DENSE = (
    "from slipstream.demo.warmstart import prepare_demo; prepare_demo({prep!r}, seed=0, log=print)"
)


def cut_dense(dense_prep: Path, prep: Path, variant: tuple) -> None:
    """`prep` = the dense demo's warm start (prompts, tokenizer) with its model as an MoE: cut into
    experts (`moe_of_dense`) or upcycled (`upcycle`)."""
    import shutil

    from slipstream.demo.warmstart import WarmStartConfig, model_config, moe_of_dense, upcycle
    from slipstream.models.hf import load_model, load_tokenizer, save_model

    if not (dense_prep / "model" / "config.json").exists():
        code = PREPARE_DENSE.format(prep=str(dense_prep))
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    (prep / "model").mkdir(parents=True, exist_ok=True)
    for f in ("train.jsonl", "eval.jsonl"):
        shutil.copy2(dense_prep / f, prep / f)
    for f in (dense_prep / "model").iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, prep / "model" / f.name)
    e, k, i, s, u = variant
    dense = load_model(dense_prep / "model")
    if u:
        cfg = WarmStartConfig(num_experts=e, num_experts_per_tok=k, moe_intermediate_size=i, upcycle=True)
        moe = upcycle(dense, model_config(cfg, load_tokenizer(dense_prep / "model")), seed=0)
    else:
        moe = moe_of_dense(dense, k, s)
    save_model(moe, prep / "model")


def run_variant(name: str, root: Path, dense_prep: Path, demo_flags: list[str]) -> dict:
    e, k, i, s, u = VARIANTS[name]
    run_dir = root / name
    prep = run_dir / "prep"
    t0 = time.perf_counter()
    if not (prep / "model" / "config.json").exists():
        if name.startswith("dense-"):
            cut_dense(dense_prep, prep, VARIANTS[name])
        else:
            code = PREPARE.format(prep=str(prep), e=e, k=k, i=i, s=s, u=u)
            subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    t1 = time.perf_counter()
    cmd = [sys.executable, "-m", "slipstream", "demo", "--moe", "--run-dir", str(run_dir), *demo_flags]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = {
        "variant": name,
        "experts": dict(num_experts=e, top_k=k, moe_intermediate_size=i, routed_scaling_factor=s, upcycle=u),
    }
    out.update(
        demo_exit=proc.returncode, prepare_s=round(t1 - t0, 1), rl_s=round(time.perf_counter() - t1, 1)
    )
    if proc.returncode not in (0, 3):  # 3 = finished, target missed
        out["error"] = proc.stderr[-2000:]
        return out
    from demo_learning import measure

    out.update(measure(run_dir))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--parallel", type=int, default=1, help="Variants run at once.")
    parser.add_argument("--run-root", type=Path, default=Path("runs/moe-demo-variants"))
    parser.add_argument(
        "--dense-prep", type=Path, default=Path("runs/demo/prep"), help="The dense demo's warm start."
    )
    parser.add_argument("--out", type=Path, help="Also write the JSON here.")
    args, demo_flags = parser.parse_known_args(argv)
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    root, dense_prep = (p if p.is_absolute() else ROOT / p for p in (args.run_root, args.dense_prep))
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda n: run_variant(n, root, dense_prep, demo_flags), args.only))
    report = {"command": " ".join(sys.argv), "demo_flags": demo_flags, "runs": results}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
