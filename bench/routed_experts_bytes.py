"""Bytes per token of the routed experts (R3's records) on the wire and in the Redis buffer.

For a few MoE shapes, groups of samples (prompt + response tokens, every fed position's experts
recorded as the engine records them) are serialized as the rollout server sends them
(`convert.sample_to_proto`: `PackedRoutedExperts`, uint8 ids up to 256 experts, int16 LE above)
and stored with `ReplayBuffer.put_group` in a real (embedded) Redis. Reported per fed position
(prompt included: len(tokens) - 1 per sample) and per response token:
- wire: the serialized sample with its records minus the same sample without;
- redis: `MEMORY USAGE` of the groups stream after the same groups with records minus without;
- repeated_int32: the superseded `rollout_routed_experts` field (varint per id) for comparison.

    .venv/bin/python bench/routed_experts_bytes.py --out bench/results/routed_experts_bytes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from buffer.embedded import EmbeddedRedis  # noqa: E402
from buffer.replay import ReplayBuffer  # noqa: E402
from slipstream.proto import types_pb2  # noqa: E402
from slipstream.rpc.convert import sample_to_proto  # noqa: E402
from slipstream.types import Sample, Status  # noqa: E402

# name: (MoE layers, top-k, experts)
SHAPES = {
    "demo-moe (2 layers, top-2 of 8)": (2, 2, 8),
    "Qwen3-30B-A3B (48 layers, top-8 of 128)": (48, 8, 128),
    "Qwen3-235B-A22B (94 layers, top-8 of 128)": (94, 8, 128),
    "DeepSeek-V3 (58 MoE layers, top-8 of 256)": (58, 8, 256),
    "Kimi-K2 (60 MoE layers, top-8 of 384)": (60, 8, 384),
}


def samples(
    layers: int, top_k: int, experts: int, prompt: int, response: int, n: int, seed: int
) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        tokens = torch.randint(150_000, (prompt + response,), generator=g).tolist()
        # distinct experts per layer, as a top-k is: the first k of a random permutation
        ids = torch.rand(len(tokens) - 1, layers, experts, generator=g).argsort(-1)[..., :top_k]
        out.append(
            Sample(
                tokens=tokens,
                response_length=response,
                status=Status.COMPLETED,
                reward=1.0,
                index=i,
                rollout_log_probs=[-0.5] * response,
                policy_versions=[3] * response,
                rollout_routed_experts=ids.reshape(len(tokens) - 1, -1).tolist(),
            )  # fmt: skip
        )
    return out


def group(ss: list[Sample]) -> types_pb2.Group:
    return types_pb2.Group(group_id=uuid.uuid4().hex, samples=[sample_to_proto(s) for s in ss])


def measure(url: str, name: str, shape: tuple[int, int, int], args: argparse.Namespace) -> dict:
    layers, top_k, experts = shape
    with_rec = [samples(layers, top_k, experts, args.prompt_len, args.response_len, args.group_size, g)
                for g in range(args.groups)]  # fmt: skip
    without = [[replace(s, rollout_routed_experts=None) for s in g] for g in with_rec]
    positions = sum(len(s.tokens) - 1 for g in with_rec for s in g)
    responses = sum(s.response_length for g in with_rec for s in g)
    wire = sum(sample_to_proto(a).ByteSize() - sample_to_proto(b).ByteSize()
               for ga, gb in zip(with_rec, without, strict=True) for a, b in zip(ga, gb, strict=True))  # fmt: skip
    old = sum(
        types_pb2.Sample(rollout_routed_experts=[types_pb2.RoutedExperts(experts=r) for r in s.rollout_routed_experts]).ByteSize()
        for g in with_rec for s in g
    )  # fmt: skip
    usage = {}
    for label, groups in (("with", with_rec), ("without", without)):
        buf = ReplayBuffer(url, f"bytes-{uuid.uuid4().hex[:8]}")
        for g in groups:
            buf.put_group(group(g))
        usage[label] = buf.redis.memory_usage(buf.keys.groups, samples=0)
        buf.redis.delete(buf.keys.groups)
    redis_bytes = usage["with"] - usage["without"]
    ids = layers * top_k
    return {
        "shape": name, "moe_layers": layers, "top_k": top_k, "num_experts": experts,
        "ids_per_position": ids, "id_bytes": 1 if experts <= 256 else 2,
        "positions": positions, "response_tokens": responses,
        "wire_bytes_per_position": round(wire / positions, 1),
        "wire_bytes_per_response_token": round(wire / responses, 1),
        "redis_bytes_per_position": round(redis_bytes / positions, 1),
        "redis_bytes_per_response_token": round(redis_bytes / responses, 1),
        "repeated_int32_bytes_per_position": round(old / positions, 1),
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=1024)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d, EmbeddedRedis(d) as server:
        rows = [measure(server.url, name, shape, args) for name, shape in SHAPES.items()]
    result = {"prompt_len": args.prompt_len, "response_len": args.response_len, "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
