"""Which GPUs each process of a one-node run gets, from slime's placement flags.

    --actor-num-gpus-per-node A     trainer processes (torchrun ranks), GPUs 0..A-1
    --rollout-num-gpus R            GPUs for rollout, after the trainer's (or the same with --colocate)
    --rollout-num-gpus-per-engine E one rollout server per E GPUs: R / E servers

With `--rollout-num-gpus 0` (the CPU default) no GPU is assigned and `--rollout-num-servers`
says how many rollout servers run. The launcher turns a plan into CUDA_VISIBLE_DEVICES per
process; a pure function so the arithmetic is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from slipstream.config import Config


@dataclass(frozen=True)
class Placement:
    trainer_procs: int
    trainer_gpus: tuple[int, ...]  # empty: no GPU assignment (CPU run)
    rollout_gpus: tuple[tuple[int, ...], ...]  # one tuple per rollout server; empty tuples on CPU

    @property
    def num_rollout_servers(self) -> int:
        return len(self.rollout_gpus)


def plan(cfg: Config) -> Placement:
    c = cfg.cluster
    if c.rollout_num_gpus == 0:
        return Placement(
            c.actor_num_gpus_per_node, (), tuple(() for _ in range(cfg.rollout.rollout_num_servers))
        )
    trainer = tuple(range(c.actor_num_gpus_per_node))
    first = 0 if c.colocate else len(trainer)
    engines = c.rollout_num_gpus // c.rollout_num_gpus_per_engine
    rollout = tuple(
        tuple(
            range(first + i * c.rollout_num_gpus_per_engine, first + (i + 1) * c.rollout_num_gpus_per_engine)
        )
        for i in range(engines)
    )
    return Placement(c.actor_num_gpus_per_node, trainer, rollout)


def cuda_visible(gpus: tuple[int, ...]) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else {}
