"""How long a trainer's checkpoint takes to write, against the disk's own speed for the same bytes.

    .venv/bin/python bench/checkpoint_save.py --layers 8 --out bench/results/checkpoint_save_cpu.json
    sh scripts/gpu_env.sh run python3 bench/checkpoint_save.py --device cuda --out bench/results/checkpoint_save_gpu.json

A Qwen3-0.6B-shaped model (--layers of its 28; fp32 masters, tied embeddings) with AdamW moments
after one step, saved with `save_checkpoint` as the trainer saves (model, optimizer shards side by
side, every file fsynced, then the renames) into --dir. The reference is the same number of bytes
written by one thread from memory with one fsync (what the disk does alone, no serialization).
The final checkpoint is what a run's shutdown waits on (issue 13 item 8), so the ratio says
whether shutdown is bound by the disk or by us. --repeats saves, each timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from slipstream.models.config import ModelConfig
from slipstream.models.hf import init_model
from slipstream.services.trainer.checkpoint import save_checkpoint


def raw_write(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` from one in-memory buffer (64 MiB writes) and fsync them."""
    block = os.urandom(64 << 20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(-(-nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = ModelConfig(tie_word_embeddings=True, num_hidden_layers=args.layers)
    device = torch.device(args.device)
    model = init_model(cfg).to(device)  # init draws from a CPU generator
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    rows = []
    try:
        for i in range(args.repeats):
            t = time.perf_counter()
            ckpt = save_checkpoint(root, i + 1, model, opt, {"policy_version": i + 1})
            seconds = time.perf_counter() - t
            nbytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
            disk = raw_write(root / "raw.bin", nbytes)
            shutil.rmtree(ckpt)
            rows.append({
                "save_s": round(seconds, 2), "bytes": nbytes, "save_gb_per_s": round(nbytes / seconds / 1e9, 2),
                "disk_s": round(disk, 2), "disk_gb_per_s": round(nbytes / disk / 1e9, 2),
                "save_over_disk": round(seconds / disk, 2),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "model": f"Qwen3-0.6B shape, {args.layers} of 28 layers, fp32 masters + AdamW moments",
        "device": args.device,
        "cpus": os.cpu_count(),
        "params": sum(p.numel() for p in model.parameters()),
        "runs": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
