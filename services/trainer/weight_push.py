"""Pushing a new policy version to the coordinator (which fans it out to every rollout server).

The weights are packed in the wire format of `slipstream.weights` (FP8 e4m3 with 128x128
block scales by default) and streamed as one manifest followed by chunks.
"""

from __future__ import annotations

import time

import grpc
import torch

from slipstream.proto import coordinator_pb2_grpc
from slipstream.weights import iter_messages, pack


def push_weights(
    stub: coordinator_pb2_grpc.CoordinatorStub,
    state_dict: dict[str, torch.Tensor],
    version: int,
    fmt: str,
    timeout: float,
) -> tuple[float, int]:
    """Pack and push one version; returns (seconds, bytes on the wire)."""
    t0 = time.perf_counter()
    # `pack` quantizes where the tensors are (on the GPU for a GPU trainer) and copies each
    # result to the host once; copying the full-precision weights first would double the traffic.
    manifest, chunks = pack({k: v.detach() for k, v in state_dict.items()}, version, fmt)
    try:
        reply = stub.PushWeights(iter_messages(manifest, chunks), timeout=timeout)
    except grpc.RpcError as e:
        raise RuntimeError(f"pushing weights v{version} failed: {e.code().name}: {e.details()}") from None
    if reply.version != version:
        raise RuntimeError(f"coordinator accepted v{reply.version}, expected v{version}")
    return time.perf_counter() - t0, manifest.total_bytes
