"""The host's part of one graphed decode step, counted on the CPU: the ATen ops the engine's step
dispatches outside the CUDA graph's body, the host -> device copies it queues, and its host time.

    python bench/engine_host_ops.py [--batch-sizes 1 64 256] [--steps 40] [--out FILE]

On a GPU every ATen op on a device tensor is a kernel launch (5-20 us of host time in PyTorch's
eager dispatch) and every host -> device copy a pinned staging copy plus an event; inside the
graph they cost the host nothing. Here the graph's step (`DecodeGraphs` without capture) runs
eagerly on a tiny model and is left out of the count and the time, so what remains is what a
GPU engine's host does between two replays (plus, on CUDA, the one status copy and event record
`finishes.py` queues, which the CPU engine does not need). Timings are the CPU's, noisy on a
shared box: the op counts are the figure to compare.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from slipstream.models import Qwen3Config, init_model
from slipstream.services.rollout.engine import NativeEngine, Request, graphs, runner, slots


class _Outside(TorchDispatchMode):
    """Counts ATen ops by name while `inside` is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def measure(batch: int, steps: int) -> dict:
    config = Qwen3Config(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
    )  # fmt: skip
    engine = NativeEngine(
        init_model(config, seed=0), eos_token_ids=[], max_batch_size=batch, preallocate=True
    )
    engine.read_late = True  # the GPU engine's order
    engine.runner.graphs = graphs.DecodeGraphs(engine.runner)
    for i in range(batch):
        engine.add_request(Request(f"r{i}", [1 + i % 7] * 16, steps + 20, seed=i))
    for _ in range(3):  # prefill, then decode-only steps
        engine.step()

    mode, body_s, copies = _Outside(), [0.0], [0]
    step_body, to_device = graphs.DecodeGraphs._step, slots.to_device

    def timed_body(self, *key):
        mode.inside += 1
        t = time.perf_counter()
        try:
            return step_body(self, *key)
        finally:
            body_s[0] += time.perf_counter() - t
            mode.inside -= 1

    def counted_copy(t, device):
        copies[0] += not mode.inside
        return to_device(t, device)

    graphs.DecodeGraphs._step = timed_body
    slots.to_device = runner.to_device = counted_copy
    try:
        with mode:
            for _ in range(steps):
                engine.step()
        ops = dict(mode.ops.most_common())
        body_s[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        host_us = 1e6 * (time.perf_counter() - t0 - body_s[0]) / steps
    finally:
        graphs.DecodeGraphs._step, slots.to_device, runner.to_device = step_body, to_device, to_device
    return {
        "batch": batch,
        "aten_ops_per_step": sum(ops.values()) / steps,
        "ops_by_name_per_step": {k: v / steps for k, v in ops.items()},
        "host_to_device_copies_per_step": copies[0] / steps,
        "host_us_per_step_cpu": round(host_us, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(b, args.steps) for b in args.batch_sizes]
    for row in rows:
        print(
            f"batch {row['batch']:>4}: {row['aten_ops_per_step']:.1f} ATen ops, "
            f"{row['host_to_device_copies_per_step']:.1f} host->device copies, "
            f"{row['host_us_per_step_cpu']:.0f} us host a step  {row['ops_by_name_per_step']}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
