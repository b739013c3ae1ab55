"""An FSDP2 trainer's weight push, gathered vs quantized shard by shard (issue 20 item 4), on N GPUs.

    sh scripts/gpu_env.sh run python3 -m torch.distributed.run --nproc-per-node 2 --standalone \\
        bench/fsdp_push_gpu.py --out bench/results/fsdp_push_gpu.json

The real `Actor` (`--bf16`: fp32 masters sharded by FSDP2, random weights of a Qwen3 shape) makes
the state of one push two ways, each followed by `weights.pack` on rank 0, per wire format:

- `gathered`: the fp32 masters gathered to rank 0's CPU (`parallel.full_model_state`, what every
  push did before), which `pack` then quantizes there;
- `sharded`: `Actor.state_dict_for_sync` under FSDP2, `parallel.wire_state`: each rank quantizes
  the rows it holds on its GPU and rank 0 gathers the quantized rows (`packer.Quantized`).

Per path: seconds to make the state and to pack it (rank 0), the bytes rank 0 received (the
state's tensors), each rank's peak GPU memory above what it held before (the gather's buffers),
and whether the packed versions are identical (manifest and every chunk's sha256).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from trainer_memory_gpu import SHAPES, write_checkpoint  # noqa: E402

from slipstream.config import config_from_values  # noqa: E402
from slipstream.services.trainer.actor import Actor  # noqa: E402
from slipstream.services.trainer.parallel import full_model_state  # noqa: E402
from slipstream.weights import pack, weights_to_sync  # noqa: E402
from slipstream.weights.packer import Quantized  # noqa: E402


def nbytes(state: dict) -> int:
    return sum(
        v.values.nbytes + v.scales.nbytes if isinstance(v, Quantized) else v.nbytes for v in state.values()
    )


def measure(actor: Actor, fmt: str) -> dict:
    rank0, out = actor.par.is_main, {}
    paths = {"gathered": lambda: full_model_state(actor.model), "sharded": actor.state_dict_for_sync}
    packed = {}
    for path, make in paths.items():
        torch.cuda.synchronize()
        dist.barrier()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        state = weights_to_sync(make(), actor.model.config.tie_word_embeddings)
        torch.cuda.synchronize()
        made_s = time.perf_counter() - t0
        peak = torch.tensor([torch.cuda.max_memory_allocated() - base], device=actor.device)
        peaks = [torch.zeros_like(peak) for _ in range(actor.par.world_size)]
        dist.all_gather(peaks, peak)
        row = {"state_s": round(made_s, 3), "gpu_peak_above_held_bytes": [int(p.item()) for p in peaks]}
        if rank0:
            t0 = time.perf_counter()
            manifest, _ = pack(state, 1, fmt)
            row |= {"pack_s": round(time.perf_counter() - t0, 3), "rank0_received_bytes": nbytes(state)}
            row["version_bytes"] = manifest.total_bytes
            packed[path] = manifest
        out[path] = row
        del state
    if rank0:
        out["identical"] = packed["gathered"] == packed["sharded"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["0.6B"], choices=list(SHAPES))
    parser.add_argument("--formats", nargs="+", default=["fp8", "int4"], choices=["fp8", "int4"])
    parser.add_argument("--out", default="bench/results/fsdp_push_gpu.json")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        shared = [tmp if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)  # one directory: rank 0 writes, every rank reads
        for name in args.shapes:
            model_dir = Path(shared[0]) / name
            if rank == 0:
                write_checkpoint(SHAPES[name], model_dir)
            dist.barrier()
            for fmt in args.formats:
                values = dict(hf_checkpoint=str(model_dir / "full"), device="cuda", bf16=True, lr=1e-6,
                              weight_sync_dtype=fmt)  # fmt: skip
                actor = Actor.from_config(config_from_values(values))
                row = {
                    "shape": name,
                    "format": fmt,
                    "world_size": dist.get_world_size(),
                    **measure(actor, fmt),
                }
                if rank == 0:
                    print(json.dumps(row), flush=True)
                rows.append(row)
                del actor
                gc.collect()
                torch.cuda.empty_cache()
            dist.barrier()
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
