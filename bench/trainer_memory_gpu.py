"""Peak trainer memory and step time on one GPU, by model size, offload and LoRA (issue 18 item 4-5).

    python bench/trainer_memory_gpu.py [--tokens 8192] [--budget-s 250] [--out ...]

The real `Actor` (loaded by `hf.load_model` from a safetensors checkpoint, random bf16 weights)
trains two rollout steps of a GRPO batch: `--bf16` (bf16 compute, fp32 master weights and AdamW
moments), packing (`--use-dynamic-batch-size --max-tokens-per-gpu --tokens`: one micro-batch of
16 samples x tokens/16), `--gradient-checkpointing`. Qwen3 shapes 0.6B, 1.7B, 4B and 8B, each:

- `full`: every weight trained, everything on the GPU;
- `offload`: `--optimizer-cpu-offload` (masters, gradients and AdamW moments in CPU memory,
  AdamW on the CPU; the GPU holds the bf16 weights and activations). Skipped, and said so, when
  the host cannot hold ~18 bytes a parameter;
- `lora`: `--lora-rank 16 --lora-alpha 32` on every projection (frozen bf16 base), for 1.7B and 8B.

Then a bounded search (`--search-probes`, bisection on the layer count at 8B's width, 4096 / 12288)
for the largest dense Qwen3 shape that trains fully (`full`) on the GPU. A case that does not fit
is a row with `oom`. Peak memory is `torch.cuda.max_memory_allocated` from the load to the end of
the second step; `step_s` is the second step's wall time; `load_s` the checkpoint load.

Checkpoints are written once per width with one safetensors file per layer, so a shape with
fewer layers is a directory of links to the first files (the search writes nothing more).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import peft  # noqa: F401  (imported before any timing: LoRA's load_s is then not the import)
import torch
from safetensors.torch import save_file

from slipstream.config import parse_config
from slipstream.models.config import ModelConfig
from slipstream.models.decoder import CausalLM
from slipstream.services.trainer.actor import Actor
from slipstream.types import Sample, Status

COMMON = dict(vocab_size=151936, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6, model_type="qwen3")  # fmt: skip
SHAPES = {  # Qwen3's published sizes
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 tie_word_embeddings=True),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               tie_word_embeddings=False),
}  # fmt: skip
LORA = ["--lora-rank", "16", "--lora-alpha", "32"]
VARIANTS = {"full": [], "offload": ["--optimizer-cpu-offload"], "lora": LORA}
LORA_SHAPES = ("1.7B", "8B")


def config(shape: dict, layers: int | None = None) -> ModelConfig:
    kw = COMMON | shape | ({"num_hidden_layers": layers} if layers else {})
    return ModelConfig(**kw)


def write_checkpoint(shape: dict, root: Path) -> Path:
    """Random bf16 weights (normal 0.02, norms 1), one file per layer plus one for the rest."""
    cfg = config(shape)
    with torch.device("meta"):
        model = CausalLM(cfg)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        file = f"layer_{int(name.split('.')[2]):03d}" if name.startswith("model.layers.") else "root"
        t = (torch.ones if name.endswith("norm.weight") else torch.randn)(
            p.shape, device="cuda", dtype=torch.bfloat16
        )
        files.setdefault(file, {})[name] = (t if name.endswith("norm.weight") else t * 0.02).cpu()
    full = root / "full"
    full.mkdir(parents=True)
    for file, tensors in files.items():
        save_file(tensors, str(full / f"{file}.safetensors"))
    hf = cfg.to_hf_dict()
    (full / "config.json").write_text(json.dumps(hf))
    return full


def with_layers(full: Path, layers: int, root: Path) -> Path:
    d = root / f"layers_{layers}"
    if d.exists():
        return d
    d.mkdir()
    hf = json.loads((full / "config.json").read_text()) | {"num_hidden_layers": layers}
    (d / "config.json").write_text(json.dumps(hf))
    (d / "root.safetensors").symlink_to(full / "root.safetensors")
    for i in range(layers):
        (d / f"layer_{i:03d}.safetensors").symlink_to(full / f"layer_{i:03d}.safetensors")
    return d


def batch(tokens: int, vocab: int) -> tuple[list[Sample], list[float]]:
    g = torch.Generator().manual_seed(0)
    n, length = 16, tokens // 16
    response = length - length // 4  # a quarter prompt
    out = []
    for i in range(n):
        toks = torch.randint(0, vocab, (length,), generator=g).tolist()
        out.append(Sample(tokens=toks, response_length=response, status=Status.COMPLETED, reward=float(i % 2),
                          rollout_log_probs=[-1.0] * response, policy_versions=[0] * response,
                          loss_mask=[1] * response))  # fmt: skip
    return out, [s.reward - 0.5 for s in out]


def host_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run(model_dir: Path, params: int, variant: str, tokens: int) -> dict:
    row = {"variant": variant, "params": params}
    if variant == "offload" and 18 * params > 0.9 * host_available():
        return row | {
            "skipped": f"host memory: needs ~{18 * params / 1e9:.0f} GB, {host_available() / 1e9:.0f} available"
        }
    flags = ["--hf-checkpoint", str(model_dir), "--rollout-batch-size", "2", "--n-samples-per-prompt", "8",
             "--lr", "1e-6", "--bf16", "--gradient-checkpointing", "--use-dynamic-batch-size",
             "--max-tokens-per-gpu", str(tokens), *VARIANTS[variant]]  # fmt: skip
    samples, scores = batch(tokens, COMMON["vocab_size"])
    actor = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        actor = Actor.from_config(parse_config(flags))
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            stats = actor.train_rollout(samples, scores)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        trained = sum(p.numel() for p in actor.model.parameters() if p.requires_grad)
        row |= {"load_s": round(load_s, 2), "step_s": round(times[1], 3), "first_step_s": round(times[0], 3),
                "tokens": tokens, "tokens_per_s": round(tokens / times[1], 1), "trained_params": trained,
                "loss": stats.loss, "grad_norm": stats.grad_norm}  # fmt: skip
    except torch.OutOfMemoryError as e:
        row |= {"oom": str(e).splitlines()[0][:300]}
    finally:
        row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        del actor
        gc.collect()
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (16 samples)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--search-probes", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=250.0, help="skip what would start after this")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "trainer_memory_gpu.json"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    rows: list[dict] = []
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bench": "trainer_memory_gpu", "gpu_gb": round(gpu_gb, 1),
                                        "tokens": args.tokens, "rows": rows}, indent=2) + "\n")  # fmt: skip

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for name in args.shapes:
            shape = SHAPES[name]
            root = Path(tmp) / name
            t0 = time.perf_counter()
            full = write_checkpoint(shape, root)
            write_s = round(time.perf_counter() - t0, 1)
            with torch.device("meta"):
                params = sum(p.numel() for p in CausalLM(config(shape)).parameters())
            measured = {}
            for variant in ["full", "offload", *(["lora"] if name in LORA_SHAPES else [])]:
                if time.perf_counter() - start > args.budget_s:
                    record({"shape": name, "variant": variant, "skipped": "time budget"})
                    continue
                measured[variant] = run(full, params, variant, args.tokens)
                record({"shape": name, "checkpoint_write_s": write_s} | measured[variant])
            if name == "8B" and args.search_probes and "full" in measured:
                search(full, root, shape, measured["full"], args, start, record)
            for f in sorted(root.rglob("*"), reverse=True):  # free the disk before the next width
                f.unlink() if f.is_file() or f.is_symlink() else f.rmdir()
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


def search(full: Path, root: Path, shape: dict, whole: dict, args, start: float, record) -> None:
    """The deepest 8B-width shape that trains fully on the GPU: first guess from ~18 bytes a
    parameter (fp32 master, gradient and two moments, bf16 copy) and the whole 8B's activations,
    then steps of two layers towards the boundary, `--search-probes` probes at most."""
    layers = shape["num_hidden_layers"]
    if "oom" not in whole:
        record(
            {
                "largest_dense_full_training": {"layers": layers, "params": whole["params"]},
                "bracket_layers": [layers, None],
            }
        )
        return
    with torch.device("meta"):
        one = sum(p.numel() for p in CausalLM(config(shape, 1)).parameters())
        two = sum(p.numel() for p in CausalLM(config(shape, 2)).parameters())
    per_layer, rest = two - one, one - (two - one)
    free = torch.cuda.get_device_properties(0).total_memory - 10e9  # room for activations
    guess = max(1, min(layers - 1, int((free / 18 - rest) // per_layer)))
    lo, hi, best, probe = 0, layers, None, guess  # lo trains (0: none known yet), hi does not
    for _ in range(args.search_probes):
        if hi - lo <= 1 or time.perf_counter() - start > args.budget_s:
            break
        row = run(with_layers(full, probe, root), rest + probe * per_layer, "full", args.tokens)
        record({"shape": f"8B-width-{probe}-layers", "search": True} | row)
        if "oom" in row:
            hi = probe
        else:
            lo, best = probe, row
        probe = min(lo + 2, hi - 1) if "oom" not in row else max(probe - 2, lo + 1)
    record({"largest_dense_full_training": best and {"layers": lo, "params": best["params"],
                                                     "peak_gpu_gb": best["peak_gpu_gb"]},
            "bracket_layers": [lo, hi]})  # fmt: skip


if __name__ == "__main__":
    main()
