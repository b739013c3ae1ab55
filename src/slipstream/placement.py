"""Which GPUs each process of a one-node run gets, from slime's placement flags.

    --actor-num-gpus-per-node A     trainer processes (torchrun ranks), GPUs 0..A-1
    --rollout-num-gpus R            GPUs for rollout, after the trainer's (or the same with --colocate)
    --rollout-num-gpus-per-engine E one rollout server per E GPUs: R / E servers

With `--rollout-num-gpus 0` (the CPU default) no GPU is assigned and `--rollout-num-servers`
says how many rollout servers run. The launcher turns a plan into CUDA_VISIBLE_DEVICES per
process; a pure function so the arithmetic is tested on its own.

`resolve` places that plan on a host with a given number of visible GPUs: the GPU each process
lands on, and colocation chosen when the one trainer process and every rollout server share one
GPU (weights then travel over CUDA IPC instead of the gRPC byte path) unless the user said
--no-colocate. The launcher prints its one line (`Resolved.line`) before starting the services.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

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


class PlacementError(ValueError):
    """A placement this host cannot hold (more GPUs than it has); the launcher prints it as one line."""


@dataclass(frozen=True)
class Resolved:
    """Where every process of the run lands on this host, and how weights reach the rollout servers.

    GPU numbers are the indices a process sees (its CUDA_VISIBLE_DEVICES, or the launcher's when
    the launcher assigns none); `None` is the CPU.
    """

    placement: Placement
    gpus: int  # GPUs visible on this host (0: a CPU run)
    trainer_on: tuple[int, ...]  # one per trainer rank; empty on the CPU
    rollout_on: tuple[int | None, ...]  # one per rollout server
    colocate: bool  # what the services run with (config.json's cluster.colocate)
    chosen: bool = False  # colocate turned on by the launcher (not asked for, not refused)
    # Rollout servers the launcher put on the shared GPU (`shared_gpu_servers`) in place of
    # --rollout-num-servers; 0 when it chose nothing.
    servers_chosen: int = 0

    @property
    def transport(self) -> str:
        # The trainer exports CUDA IPC handles only with --colocate on a GPU (loop.py).
        return "CUDA IPC" if self.colocate and self.trainer_on else "gRPC bytes"

    def line(self) -> str:
        """One console line: which GPU each service uses, colocated or not, the weight transport."""
        if not self.trainer_on:
            n = len(self.rollout_on)
            where = f"no GPU: trainer and {n} rollout server{'s' if n != 1 else ''} on the CPU"
        else:
            t = self.trainer_on
            trainer = f"trainer GPU {t[0]}" if len(t) == 1 else f"trainer GPUs {_gpus(t)} ({len(t)} ranks)"
            servers = ", ".join(
                f"rollout-{i} {'CPU' if g is None else f'GPU {g}'}" for i, g in enumerate(self.rollout_on)
            )
            where = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''} visible: {trainer}, {servers}"
        if self.chosen:
            how = (
                f"colocated (chosen: trainer and rollout share GPU {self.trainer_on[0]}; "
                "--no-colocate keeps the byte path)"
            )
        else:
            how = "colocated (--colocate)" if self.colocate else "not colocated"
        n = self.servers_chosen
        servers = (
            f"; {'one rollout server' if n == 1 else f'{n} rollout servers'} on the shared GPU "
            f"({'a model under 100M parameters decodes host-bound; ' if n > 1 else ''}"
            "--rollout-num-servers sets the number)"
            if n
            else ""
        )
        return f"placement: {where}; {how}; weights over {self.transport}{servers}"


def _gpus(gpus: tuple[int, ...]) -> str:
    return ",".join(map(str, gpus))


def _fits(trainer: tuple[int, ...], rollout: tuple[int | None, ...], gpus: int) -> bool:
    return all(g < gpus for g in (*trainer, *rollout) if g is not None)


def _landing(cfg: Config, place: Placement) -> tuple[tuple[int, ...], tuple[int | None, ...]]:
    """The GPU each trainer rank and each rollout server uses under `place` (on a GPU host)."""
    if place.trainer_gpus:  # --rollout-num-gpus > 0: the launcher assigns every GPU
        return place.trainer_gpus, tuple(g[0] if g else None for g in place.rollout_gpus)
    # No assignment: every process sees the launcher's GPUs. A single process takes --device's
    # (cuda:N, or the first), torchrun ranks their LOCAL_RANK, each rollout server the same one.
    device = cfg.infra.device
    first = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    trainer = (first,) if place.trainer_procs == 1 else tuple(range(place.trainer_procs))
    return trainer, tuple(first for _ in place.rollout_gpus)


SMALL_MODEL_PARAMS = 100_000_000  # under it, a rollout server's decode is bound by its host work
SMALL_MODEL_SERVERS = 4


def shared_gpu_servers(model_params: int | None) -> int:
    """Rollout servers on a GPU shared with the trainer when --rollout-num-servers is not given.

    One for a model whose decode fills the GPU: Qwen3-0.6B's shape ran the mesh at 96% of its
    parts' speed with one engine, 85% with two time-slicing the H200 (bench/mesh_gpu.py). Four for
    a model under 100M parameters, whose decode costs the GPU little and each server's per-sample
    host work (requests, `Sample`s, rewards, the buffer) a lot: a 25M model's trainer waited 0.43 s
    of a 0.66 s step for samples with one server, 0.01-0.03 s with four (bench/learn_vs_trl.py
    --preset h200, session 9). The threshold sits between those two measured sizes."""
    return SMALL_MODEL_SERVERS if model_params is not None and model_params < SMALL_MODEL_PARAMS else 1


def model_parameters(hf_checkpoint: str) -> int | None:
    """Weight-matrix parameters a token passes through (MoE: the experts it is routed to; norms left
    out), from config.json alone (no torch: the launcher starts services before anything imports
    it); None when unreadable."""
    try:
        c = json.loads((Path(hf_checkpoint) / "config.json").read_text())
        hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        heads = c["num_attention_heads"]
        kv, head_dim = c.get("num_key_value_heads", heads), c.get("head_dim") or hidden // heads
        mlp = (
            3
            * hidden
            * c.get("moe_intermediate_size", c["intermediate_size"])
            * c.get("num_experts_per_tok", 1)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    return layers * (attention + mlp) + embeddings


def resolve(cfg: Config, gpus: int, given: Collection[str] = (), model_params: int | None = None) -> Resolved:
    """The run's placement on a host with `gpus` visible GPUs (pure: the count and the model's
    size, `model_parameters`, are inputs).

    With every rollout server on the one GPU the (single) trainer process uses, weights go over
    CUDA IPC: the launcher turns --colocate on unless the user gave it (`given`, from
    `given_fields`: an explicit --no-colocate, in flags, --config or SLIPSTREAM_COLOCATE, wins).
    Rollout servers without GPUs of their own share the trainer's: `shared_gpu_servers` engines (one,
    or four for a small model), unless --rollout-num-servers was given. A placement that
    needs more GPUs than the host has is refused; one process trainer and one rollout GPU on a
    one-GPU host colocate instead.
    """
    c = cfg.cluster
    place = plan(cfg)
    if gpus <= 0 or cfg.infra.device == "cpu":
        return Resolved(place, 0, (), tuple(None for _ in place.rollout_gpus), c.colocate)
    chosen, servers_chosen = False, 0
    if not place.trainer_gpus and "rollout_num_servers" not in given:
        servers_chosen = shared_gpu_servers(model_params)
        cfg = replace(cfg, rollout=replace(cfg.rollout, rollout_num_servers=servers_chosen))
        place = plan(cfg)
    if not c.colocate and "colocate" not in given and place.trainer_procs == 1:
        trainer, rollout = _landing(cfg, place)
        if not _fits(trainer, rollout, gpus) or set(rollout) == set(trainer):
            shared = replace(cfg, cluster=replace(c, colocate=True))
            together = plan(shared)
            trainer, rollout = _landing(shared, together)
            if _fits(trainer, rollout, gpus) and set(rollout) == set(trainer):
                place, chosen = together, True
    trainer, rollout = _landing(cfg, place)
    if not _fits(trainer, rollout, gpus):
        used = tuple(sorted(set(trainer) | {g for g in rollout if g is not None}))
        raise PlacementError(
            f"placement needs GPUs {_gpus(used)} (trainer {_gpus(trainer)}, rollout "
            f"{_gpus(tuple(g for g in rollout if g is not None))}) but {gpus} "
            f"{'is' if gpus == 1 else 'are'} visible; lower --actor-num-gpus-per-node/--rollout-num-gpus "
            "or share GPUs with --colocate"
        )
    return Resolved(place, gpus, trainer, rollout, c.colocate or chosen, chosen, servers_chosen)


def visible_gpus(environ: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> int:
    """GPUs this host shows the launcher: the NVIDIA device nodes, narrowed by CUDA_VISIBLE_DEVICES.

    Counted without torch: importing it (and its CUDA libraries) cost the launcher ~3 s on the
    H200 before any service could start (issue 13 item 8). CUDA_VISIBLE_DEVICES lists indices or
    UUIDs up to the first invalid entry, as CUDA reads it; empty means none.
    """
    nodes = sum(1 for p in dev.glob("nvidia*") if p.name[len("nvidia") :].isdigit())
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if visible is None or not nodes:
        return nodes
    count = 0
    for entry in visible.split(","):
        entry = entry.strip()
        valid = entry.startswith(("GPU-", "MIG-")) or (entry.isdigit() and int(entry) < nodes)
        if not valid:
            break  # CUDA ignores everything from the first entry it cannot use
        count += 1
    return min(count, nodes)


def given_fields(argv: list[str], environ: Mapping[str, str]) -> frozenset[str]:
    """The config fields the user set (a flag, a --config key or SLIPSTREAM_<FIELD>): the ones the
    launcher never chooses for them (colocation, rollout servers per GPU)."""
    from slipstream.config import ENV_PREFIX, _flatten_file, _read_file, build_parser

    ns, _ = build_parser().parse_known_args(argv)  # defaults are SUPPRESSed: only what was given
    fields = set(vars(ns)) - {"config"}
    fields |= {k[len(ENV_PREFIX) :].lower() for k in environ if k.startswith(ENV_PREFIX)}
    if getattr(ns, "config", None):
        fields |= set(_flatten_file(_read_file(ns.config), ns.config))
    return frozenset(fields)
