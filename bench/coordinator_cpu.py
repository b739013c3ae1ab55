"""The coordinator's pipeline alone: CPU seconds per training step at a given shape, no gRPC,
Redis or reward service.

    python bench/coordinator_cpu.py [--groups 256] [--samples 8] [--servers 4] [--steps 12] [--out FILE]

The H200 preset of `learn_vs_trl.py` (256 prompts x 8 samples, four rollout servers) made the
coordinator the mesh's bottleneck: one event loop handles every sample of a step. This drives the
real `Pipeline` with the test suite's outside world (`tests/test_pipeline.py`'s `World` and
`Notebook`: streams with a capacity, a reward that pays the label, an in-memory buffer): each
step, every stream's work items come back as results in bursts of 64, then the trainer's new
version opens the next window (one version stale). What it counts is the pipeline's own work per
step (admission, work items, results, scoring, positions, stores) plus building the fake results,
which is the same on both sides of a change. `time.process_time`, median over steps after the
first two; the figure to compare is before against after on one box.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_pipeline import Notebook, World, _result, _settle  # noqa: E402

from slipstream.algorithms.staleness import StalenessBound  # noqa: E402
from slipstream.buffer.coordinator_store import CoordinatorCounters  # noqa: E402
from slipstream.config import config_from_values  # noqa: E402
from slipstream.data import PromptRecord  # noqa: E402
from slipstream.services.coordinator.dispatch_log import DispatchLog  # noqa: E402
from slipstream.services.coordinator.pipeline import Pipeline, PipelineSettings  # noqa: E402
from slipstream.services.coordinator.prompts import Prompts  # noqa: E402

BURST = 64  # results a message carries back (a step's finished samples, coalesced)


async def run(groups: int, samples: int, servers: int, steps: int) -> list[float]:
    records = [PromptRecord(prompt=f"q{i}", label=f"a{i}") for i in range(groups * (steps + 2))]
    cfg = config_from_values(
        {
            "rollout_batch_size": groups,
            "n_samples_per_prompt": samples,
            "num_rollout": steps + 2,
            "rollout_max_response_len": 8,
            "micro_batch_size": 1,
        }
    )
    bound = StalenessBound(max_staleness=1, groups_per_version=groups, total_groups=len(records))
    world, journal = World({f"s#{i}": 2 * groups * samples // servers for i in range(servers)}), Notebook()
    prompts = Prompts(records, [[1, 2, i % 50] for i in range(len(records))], shuffle=False, seed=0)
    pipeline = Pipeline(
        PipelineSettings(cfg.rollout, bound, seed=7),
        prompts,
        world.ports(),
        journal,
        DispatchLog(None),
        CoordinatorCounters(),
    )
    pipeline.dispatch()
    per_step = []
    for step in range(steps):
        t = time.process_time()
        while len(journal.buffer) < (step + 1) * groups:
            for cid in list(world.streams):
                items = world.work(cid)
                for i in range(0, len(items), BURST):
                    pipeline.on_results(cid, [_result(item) for item in items[i : i + BURST]])
                    await asyncio.sleep(0)
            await _settle()
        world.version += 1
        pipeline.on_new_version()
        per_step.append(time.process_time() - t)
    await pipeline.close()
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=256, help="prompts a step (--rollout-batch-size)")
    parser.add_argument("--samples", type=int, default=8, help="--n-samples-per-prompt")
    parser.add_argument("--servers", type=int, default=4, help="rollout streams")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    per_step = asyncio.run(run(args.groups, args.samples, args.servers, args.steps))
    # One version stale, a step's results can land in the step before: pairs of steps are the unit.
    pairs = [a + b for a, b in zip(per_step[2::2], per_step[3::2], strict=False)]
    result = {
        "shape": {"groups": args.groups, "samples": args.samples, "servers": args.servers},
        "cpu_s_per_step": [round(x, 4) for x in per_step],
        "median_cpu_s_per_step": round(statistics.median(pairs) / 2, 4),
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
