"""Weight-sync seconds over the byte path, FP8 vs bf16, for a Qwen3-0.6B-shaped model.

    python bench/weight_sync.py [--shape 0.6b|demo] [--out bench/results/weight_sync.json]

One version travels the whole byte path with the real pieces, timed stage by stage:
trainer `pack` (block-quantize on the trainer's device, copy to host, sha256 per chunk) ->
`PushWeights` over loopback gRPC into a relay that checks every chunk with the coordinator's
own `receive_push` -> `FetchWeights` back out -> `WeightStager` (verify, dequantize) ->
`NativeEngine.load_weights` (copy into the serving model). Ours is the only system here;
the issue's target (< 0.3 s for 0.6B) is the reference. CUDA IPC (colocated) is not built.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch

from slipstream.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc
from slipstream.rpc.channel import aio_channel
from slipstream.rpc.server import start_server
from slipstream.services.coordinator.weights_relay import WeightRelay, receive_push
from slipstream.services.rollout.engine import NativeEngine
from slipstream.weights import WeightStager, iter_messages, pack

SHAPES = {
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "demo": dict(vocab_size=20, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}  # fmt: skip


class Relay(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self) -> None:
        self.relay = WeightRelay()

    async def PushWeights(self, request_iterator, context):  # noqa: N802
        stored = await receive_push(request_iterator, self.relay.version)
        self.relay.commit(stored)
        return coordinator_pb2.PushWeightsReply(version=stored.version)

    async def FetchWeights(self, request, context):  # noqa: N802
        for msg in self.relay.lookup(request.version).messages:
            yield msg


async def one_sync(model, engine, version: int, fmt: str, stub) -> dict[str, float]:
    t = {}
    t0 = time.perf_counter()
    manifest, chunks = pack({k: v.detach() for k, v in model.state_dict().items()}, version, fmt)
    t["pack_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    await stub.PushWeights(iter_messages(manifest, chunks), timeout=120)
    t["push_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stager = WeightStager({k: tuple(v.shape) for k, v in model.state_dict().items()}, version - 1)
    async for msg in stub.FetchWeights(coordinator_pb2.FetchWeightsRequest(version=version), timeout=120):
        stager.add(msg)
    t["fetch_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, tensors = stager.finish()
    t["stage_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.load_weights(tensors, version)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t["load_s"] = time.perf_counter() - t0
    t["total_s"] = sum(t.values())
    t["wire_mb"] = manifest.total_bytes / 1e6
    return t


async def main_async(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Qwen3Config(**SHAPES[args.shape])
    trainer = Qwen3ForCausalLM(config).to(device=device, dtype=dtype)
    serving = Qwen3ForCausalLM(config).to(device=device, dtype=dtype)
    engine = NativeEngine(serving, eos_token_ids=[], max_batch_size=8)
    service = await start_server(lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(Relay(), s))
    stub = coordinator_pb2_grpc.CoordinatorStub(aio_channel(f"127.0.0.1:{service.port}"))
    rows, version = [], 0
    for fmt in ("fp8", "bf16"):
        runs = []
        for _ in range(args.repeats + 1):  # the first one warms up
            version += 1
            runs.append(await one_sync(trainer, engine, version, fmt, stub))
        best = min(runs[1:], key=lambda r: r["total_s"])
        rows.append({"format": fmt, **{k: round(v, 4) for k, v in best.items()}})
        print(fmt, {k: round(v, 3) for k, v in best.items()})
    await service.stop(0)
    return {
        "bench": "weight_sync",
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "params": sum(p.numel() for p in trainer.parameters()),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "weight_sync.json")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
