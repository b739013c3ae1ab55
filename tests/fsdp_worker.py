"""Run by tests/test_parallel.py under torchrun (gloo, CPU): FSDP2 training steps + a checkpoint.

    python -m torch.distributed.run --nproc-per-node N tests/fsdp_worker.py MODEL_DIR OUT_DIR [schedule]

Every rank trains on its slice of one fixed global batch for two AdamW steps, then the ranks
write one checkpoint together (rank 0 writes the files).

`schedule`: rank 0 drives five trainer steps as the trainer's rank 0 does (share the step,
train, maybe push, maybe save; the last save when it stops) with --update-weights-interval 2
and --save-interval 3; the other ranks run the trainer's own `ranks.follow` under a config that
says 1 and 1. Each rank writes what it did, in order, to OUT_DIR/events_<rank>.json.

`memory`: each rank builds the trainer's `Actor` (policy and KL reference, both loaded sharded)
and trains one step, while measuring what it materialises: the bytes each `load_model` call read
from the safetensors files and its largest read, the bytes of the parameters it holds, and the
largest tensor any torch operation produced (a dispatch mode: FSDP's all-gather buffers
included). Written to OUT_DIR/memory_<rank>.json.
"""

import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

sys.path.insert(0, str(Path(__file__).parent))

from slipstream.models.hf import load_model  # noqa: E402
from slipstream.services.trainer.checkpoint import save_checkpoint  # noqa: E402
from slipstream.services.trainer.parallel import init_parallel, shard_model, shutdown  # noqa: E402

GLOBAL_BATCH = 8
# `qat` and `wire` on GPUs (NCCL, one GPU a rank): tests/test_fsdp_gpu.py sets it to cuda.
DEVICE = os.environ.get("FSDP_WORKER_DEVICE", "cpu")


def run_two_ranks(model_dir, out, mode: str | None, timeout: float = 240, env: dict | None = None) -> None:
    """This worker's `mode` (None: two steps and a checkpoint) on two ranks under torchrun (gloo on
    CPU unless FSDP_WORKER_DEVICE), from a test; its stderr's tail when it fails. `timeout` holds on an idle 2-core box (`scaled` here);
    a rank that aborts prints every thread's Python stack (faulthandler) into that tail."""
    import subprocess

    from machine_speed import scaled

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        str(Path(__file__)), str(model_dir), str(out), *([mode] if mode else []),
    ]  # fmt: skip
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(timeout), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def largest_tensor_mode():
    """A dispatch mode that records the largest tensor any torch operation produces (`.largest`,
    bytes; FSDP's all-gather buffers included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, tuple | list) else (result,):
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    self.largest = max(self.largest, t.nbytes)
            return result

    return LargestTensor()


def global_batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(7))


def train(model: torch.nn.Module, tokens: torch.Tensor, steps: int = 2) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
    return opt


def schedule(model_dir: str, out: Path):
    from slipstream.config import config_from_values
    from slipstream.services.trainer.actor import Actor
    from slipstream.services.trainer.checkpointer import Checkpointer
    from slipstream.services.trainer.ranks import SharedStep, follow, share_step, weight_gather
    from slipstream.services.trainer.versions import Versions
    from slipstream.types import Sample, Status

    rank0 = int(os.environ["RANK"]) == 0
    cfg = config_from_values(
        dict(
            hf_checkpoint=model_dir, rollout_batch_size=2, n_samples_per_prompt=2, micro_batch_size=1,
            lr=1e-2, device="cpu", rollout_max_response_len=4,
            update_weights_interval=2 if rank0 else 1, save_interval=3 if rank0 else 1,
        )
    )  # fmt: skip
    actor = Actor.from_config(cfg)
    ckpt = Checkpointer(out, cfg.train.save_interval, actor.model, actor.optimizer, actor.par)
    events: list[str] = []
    train, sync, save = actor.train_rollout, actor.state_dict_for_sync, ckpt.save
    actor.train_rollout = lambda *a: (events.append("train"), train(*a))[1]
    actor.state_dict_for_sync = lambda: (events.append("push"), sync())[1]
    ckpt.save = lambda step: (events.append(f"save {step}"), save(step))[1]
    if rank0:
        samples = [
            Sample(tokens=[7, 8, 9, 5 + i, 6 + i], response_length=2, reward=float(i % 2),
                   status=Status.COMPLETED, rollout_log_probs=[-1.0, -1.0], policy_versions=[0, 0])
            for i in range(4)
        ]  # fmt: skip
        scores = [1.0, -1.0, 0.5, -0.5]
        versions, gather = Versions(None, cfg.train.update_weights_interval), weight_gather(actor)  # type: ignore[arg-type]
        gather(False)  # nothing to push before the first step
        for step in range(1, 6):
            share_step(actor.par, SharedStep(step, samples, scores, 0))
            actor.train_rollout(samples, scores, 0)
            gather(versions.push_due(step))
            ckpt.maybe_save(step)
        share_step(actor.par, None)
        ckpt.maybe_save(5, last=True)
    else:
        follow(actor, ckpt, 0)
    (out / f"events_{actor.par.rank}.json").write_text(json.dumps(events))
    return actor.par


class _CountingSlices:
    """Observes `safe_open`: the bytes of every tensor read through it (library wrapped, not ours)."""

    def __init__(self, handle, reads: list[int]):
        self.handle, self.reads = handle, reads

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name):
        t = self.handle.get_tensor(name)
        self.reads.append(t.nbytes)
        return t

    def get_slice(self, name):
        handle, reads = self.handle.get_slice(name), self.reads

        class Slice:
            def get_shape(self):
                return handle.get_shape()

            def __getitem__(self, index):
                t = handle[index]
                reads.append(t.nbytes)
                return t

        return Slice()


def memory(model_dir: str, out: Path):
    import slipstream.models.hf as hf
    from slipstream.config import config_from_values
    from slipstream.services.trainer import actor as actor_module
    from slipstream.types import Sample, Status

    loads: list[dict] = []
    reads: list[int] = []
    real_open, real_load = hf.safe_open, actor_module.load_model
    hf.safe_open = lambda *a, **k: _CountingSlices(real_open(*a, **k), reads)

    def counted_load(*a, **k):
        reads.clear()
        model = real_load(*a, **k)
        loads.append({"bytes_read": sum(reads), "largest_read": max(reads)})
        return model

    actor_module.load_model = counted_load

    cfg = config_from_values(
        dict(
            hf_checkpoint=model_dir, rollout_batch_size=2, n_samples_per_prompt=2, micro_batch_size=1,
            lr=1e-2, device="cpu", rollout_max_response_len=4, use_kl_loss=True, kl_loss_coef=0.1,
        )
    )  # fmt: skip
    samples = [
        Sample(tokens=[7, 8, 9, 5 + i, 6 + i], response_length=2, reward=float(i % 2),
               status=Status.COMPLETED, rollout_log_probs=[-1.0, -1.0], policy_versions=[0, 0])
        for i in range(4)
    ]  # fmt: skip
    with largest_tensor_mode() as largest:
        actor = actor_module.Actor.from_config(cfg)
        actor.train_rollout(samples, [1.0, -1.0, 0.5, -0.5], 0)

    def held(model):
        return sum(getattr(p, "to_local", lambda p=p: p)().nbytes for p in model.parameters())

    report = {
        "loads": loads,
        "policy_bytes_held": held(actor.model),
        "ref_bytes_held": held(actor.ref_model),
        "largest_tensor": largest.largest,
    }
    (out / f"memory_{actor.par.rank}.json").write_text(json.dumps(report))
    return actor.par


def draft(model_dir: str, out: Path):
    """--enable-mtp-training under FSDP2: two training steps; rank 0 writes the draft it ends with,
    every rank checks that its replica is rank 0's."""
    import torch.distributed as dist

    from slipstream.config import config_from_values
    from slipstream.services.trainer.actor import Actor

    cfg = config_from_values(draft_config(model_dir))
    actor = Actor.from_config(cfg)
    for _ in range(2):
        actor.train_rollout(draft_samples(), [1.0, -1.0] * 4)
    state = actor.draft.state_dict()
    for name, t in state.items():
        theirs = t.clone()
        dist.broadcast(theirs, src=0)
        assert torch.equal(t, theirs), f"rank {actor.par.rank}: draft {name} differs from rank 0's"
    if actor.par.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "draft.safetensors"))
    save_checkpoint(out / "ckpt", 2, actor.model, actor.optimizer, {"policy_version": 2}, par=actor.par,
                    draft=actor.draft_parts)  # fmt: skip
    return actor.par


def draft_config(model_dir: str) -> dict:
    return dict(
        hf_checkpoint=model_dir, rollout_batch_size=2, n_samples_per_prompt=4, micro_batch_size=2,
        lr=1e-2, device="cpu", rollout_max_response_len=8, mtp_num_layers=1, enable_mtp_training=True,
    )  # fmt: skip


def draft_samples() -> list:
    from slipstream.types import Sample, Status

    return [
        Sample(tokens=[7, 8, 9] + [5 + (i + j) % 12 for j in range(8)], response_length=8, reward=float(i % 2),
               status=Status.COMPLETED, rollout_log_probs=[-2.0] * 8, policy_versions=[0] * 8)
        for i in range(8)
    ]  # fmt: skip


def lora_values(model_dir: str) -> dict:
    return dict(
        hf_checkpoint=model_dir, rollout_batch_size=2, n_samples_per_prompt=2, micro_batch_size=1,
        lr=5e-2, device="cpu", rollout_max_response_len=4, lora_rank=4, lora_alpha=8.0,
        target_modules="q_proj,v_proj,down_proj",
    )  # fmt: skip


def lora_step(actor) -> None:
    from slipstream.types import Sample, Status

    samples = [
        Sample(tokens=[7, 8, 9, 5 + i, 6 + i], response_length=2, reward=float(i % 2),
               status=Status.COMPLETED, rollout_log_probs=[-1.0, -1.0], policy_versions=[0, 0])
        for i in range(4)
    ]  # fmt: skip
    actor.train_rollout(samples, [1.0, -1.0, 0.5, -0.5], 0)


def lora(model_dir: str, out: Path):
    """--lora-rank under FSDP2: two steps, the push, a checkpoint; then a second actor (other
    adapters at the start) resumes from it and both take a third step. Rank 0 writes the pushes
    (pushed_2, pushed_3, resumed_3) and what each rank holds of the base (base_<rank>.json)."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    from slipstream.config import config_from_values
    from slipstream.services.trainer.actor import Actor
    from slipstream.services.trainer.checkpoint import load_trainer_state

    cfg = config_from_values(lora_values(model_dir))
    torch.manual_seed(0)
    actor = Actor.from_config(cfg)
    base = [(n, p) for n, p in actor.model.named_parameters() if ".lora_" not in n]
    held = {
        "base_sharded": all(isinstance(p, DTensor) for _, p in base),
        "base_bytes_held": sum(p.to_local().nbytes for _, p in base),
        "adapters_trained": sorted(n for n, p in actor.model.named_parameters() if p.requires_grad),
    }
    (out / f"base_{actor.par.rank}.json").write_text(json.dumps(held))
    pushes: dict[str, dict] = {}
    for _ in range(2):
        lora_step(actor)
    pushes["pushed_2"] = actor.state_dict_for_sync()
    ckpt = save_checkpoint(out / "ckpt", 2, actor.model, actor.optimizer, {"policy_version": 2},
                           par=actor.par, scheduler=actor.scheduler)  # fmt: skip
    torch.manual_seed(1)  # other adapters to start from: the checkpoint must replace them
    resumed = Actor.from_config(cfg)
    load_trainer_state(ckpt, resumed.model, resumed.optimizer, resumed.scheduler)
    for a in (actor, resumed):
        lora_step(a)
    pushes["pushed_3"], pushes["resumed_3"] = actor.state_dict_for_sync(), resumed.state_dict_for_sync()
    if actor.par.is_main:
        for name, state in pushes.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{name}.safetensors"))
    return actor.par


QAT_MODES = {
    "int4": dict(int4_qat=True),
    "fp8": dict(fp8_format="e4m3"),
    # bf16 compute: FSDP2 gathers the other weights in bf16, the quantized projections in fp32
    "fp8_bf16": dict(fp8_format="e4m3", bf16=True),
}
QAT_TOKENS = [[3, 7, 8, 9, 5, 6, 4, 2, 11, 12]]


def qat_values(model_dir: str, mode: str) -> dict:
    return dict(
        hf_checkpoint=model_dir, rollout_batch_size=2, n_samples_per_prompt=2, micro_batch_size=1,
        lr=1e-3, device=DEVICE, rollout_max_response_len=4, **QAT_MODES[mode],
    )  # fmt: skip


def qat_steps(actor, steps: int = 3) -> list[float]:
    """`steps` trainer steps on fixed samples; their losses."""
    from slipstream.types import Sample, Status

    samples = [
        Sample(tokens=[7, 8, 9] + [5 + (i * 3 + j) % 15 for j in range(2 + i % 3)], response_length=2 + i % 3,
               reward=float(i % 2), status=Status.COMPLETED, rollout_log_probs=[-1.0] * (2 + i % 3),
               policy_versions=[0] * (2 + i % 3))
        for i in range(4)
    ]  # fmt: skip
    return [actor.train_rollout(samples, [1.0, -1.0, 0.5, -0.5], 0).loss for _ in range(steps)]


def qat(model_dir: str, out: Path, modes=tuple(QAT_MODES)):
    """--int4-qat and --fp8-format e4m3 under FSDP2 (`modes`), one after the other: three steps, then the
    logits of QAT_TOKENS under the trained (sharded, quantized-in-forward) model, the masters, and
    whether the push (`state_dict_for_sync`, quantized shard by shard) packs the masters' bytes.
    Rank 0 writes qat_<mode>.json and the masters to pushed_<mode>.safetensors."""
    from safetensors.torch import save_file

    from slipstream.config import config_from_values
    from slipstream.services.trainer.actor import Actor
    from slipstream.services.trainer.parallel import full_model_state
    from slipstream.weights import pack, weights_to_sync

    for mode in modes:
        actor = Actor.from_config(config_from_values(qat_values(model_dir, mode)))
        losses = qat_steps(actor)
        with torch.no_grad():
            logits = actor.model(torch.tensor(QAT_TOKENS, device=actor.device)).float().cpu()
        pushed = weights_to_sync(full_model_state(actor.model), actor.model.config.tie_word_embeddings)
        wire = actor.state_dict_for_sync()  # the push itself: quantized shard by shard
        if actor.par.is_main:
            fmt = actor.wire_format
            report = {"losses": losses, "logits": logits.tolist(), "push_format": fmt}
            report["push_is_the_masters_quantized"] = pack(wire, 1, fmt) == pack(pushed, 1, fmt)
            (out / f"qat_{mode}.json").write_text(json.dumps(report))
            save_file({k: v.contiguous() for k, v in pushed.items()}, str(out / f"pushed_{mode}.safetensors"))
    return actor.par


def qat_moe(model_dir: str, out: Path):
    """Unified FP8 on an MoE: `qat`'s fp8 mode (the stacked experts are FP8 units of their own)."""
    return qat(model_dir, out, modes=("fp8",))


def moe_values(model_dir: str) -> dict:
    """An MoE trained with the load-balancing loss (its router logits kept through the forward)."""
    return qat_values(model_dir, "int4") | dict(int4_qat=False, moe_aux_loss_coeff=0.01)


def moe(model_dir: str, out: Path):
    """An MoE under FSDP2: three steps; rank 0 writes the losses and the step's metrics (moe.json)."""
    from slipstream.config import config_from_values
    from slipstream.services.trainer.actor import Actor

    actor = Actor.from_config(config_from_values(moe_values(model_dir)))
    losses = qat_steps(actor)
    if actor.par.is_main:
        (out / "moe.json").write_text(json.dumps({"losses": losses}))
    return actor.par


WIRE_MODES = {"fp8": dict(weight_sync_dtype="fp8"), "int4": dict(weight_sync_dtype="int4")}


def wire(model_dir: str, out: Path):
    """The push under FSDP2 quantized shard by shard (`parallel.wire_state`) against the gathered
    fp32 state it replaces, per wire format: rank 0 packs both (wire_<fmt>.json says whether
    manifests and chunks are equal, and the bytes rank 0 received: the state's tensors); every
    rank records the largest tensor each path materialised (wire_<fmt>_<rank>.json)."""
    from slipstream.config import config_from_values
    from slipstream.services.trainer.actor import Actor
    from slipstream.services.trainer.parallel import full_model_state
    from slipstream.weights import pack, weights_to_sync
    from slipstream.weights.packer import Quantized

    def nbytes(state: dict) -> int:
        return sum(v.values.nbytes + v.scales.nbytes if isinstance(v, Quantized) else v.nbytes
                   for v in state.values())  # fmt: skip

    for fmt, flags in WIRE_MODES.items():
        cfg = config_from_values(dict(hf_checkpoint=model_dir, device=DEVICE, lr=1e-3, **flags))
        actor = Actor.from_config(cfg)
        report = {}
        for path, gather in (("gathered", lambda a=actor: full_model_state(a.model)),
                             ("sharded", actor.state_dict_for_sync)):  # fmt: skip
            with largest_tensor_mode() as largest:
                state = gather()
            state = weights_to_sync(state, actor.model.config.tie_word_embeddings)
            report[path] = {"largest_tensor": largest.largest, "received": nbytes(state)}
            if actor.par.is_main:
                report[path]["packed"] = pack(state, 1, fmt, chunk_bytes=1 << 16)
        if actor.par.is_main:
            (gathered_manifest, gathered_chunks), (manifest, chunks) = (
                report[p].pop("packed") for p in ("gathered", "sharded")
            )
            report["same_manifest"] = manifest == gathered_manifest
            report["same_chunks"] = chunks == gathered_chunks
            report["total_bytes"] = manifest.total_bytes
            report["quantized_on_ranks"] = sorted(n for n, v in state.items() if isinstance(v, Quantized))
        (out / f"wire_{fmt}_{actor.par.rank}.json").write_text(json.dumps(report))
    return actor.par


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    modes = {
        "schedule": schedule,
        "memory": memory,
        "draft": draft,
        "lora": lora,
        "qat": qat,
        "qat_moe": qat_moe,
        "wire": wire,
        "moe": moe,
    }
    if sys.argv[3:] and sys.argv[3] in modes:
        out.mkdir(parents=True, exist_ok=True)
        leave(modes[sys.argv[3]](model_dir, out))
    par = init_parallel(torch.device("cpu"))
    model = shard_model(load_model(model_dir), par)
    tokens = global_batch(model.config.vocab_size)
    share = GLOBAL_BATCH // par.world_size
    opt = train(model, tokens[par.rank * share : (par.rank + 1) * share])
    save_checkpoint(out, 2, model, opt, {"policy_version": 2}, par=par)
    leave(par)


def leave(par) -> NoReturn:
    """End a rank whose mode returned: the ranks leave the group together (a barrier, then
    destroy_process_group), then the process exits as the trainer's do (`exit_now`: streams
    flushed, no interpreter teardown).

    Before, each rank destroyed the group and ran Python's teardown as soon as its own mode
    returned, while the other could still be working (rank 0 writes the reports after the last
    collective, and the ranks of the qat, wire and lora modes build new actors one after another).
    That teardown frees what FSDP2 and DTensor keep of the process group, gloo's connections
    and the threads behind them in whatever order the garbage collector finds them. Once, in a
    loaded `make test`, rank 1 of the qat mode (the rank that finishes first) died while rank 0
    still ran, with "terminate called without an active exception" (SIGABRT: a C++ thread object
    destroyed while its thread runs, what such a teardown produces), and every test of
    tests/test_fsdp_qat.py errored in setup."""
    import torch.distributed as dist

    from slipstream.rpc.server import exit_now

    if par.enabled and dist.is_initialized():
        dist.barrier(device_ids=[par.device.index] if par.device.type == "cuda" else None)
    shutdown(par)
    exit_now(0)


if __name__ == "__main__":
    main()
