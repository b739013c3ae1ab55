"""Data parallelism for the trainer: FSDP2 across the trainer's processes (torchrun).

One trainer process is the default. Under `torchrun --nproc-per-node N` (or any launcher that
sets RANK/WORLD_SIZE/MASTER_ADDR), every process holds a shard of the parameters, gradients and
AdamW state (`torch.distributed.fsdp.fully_shard`, one unit per decoder layer plus the root),
trains on its slice of each global batch, and FSDP reduce-scatters the gradients. NCCL on GPUs,
gloo on CPU, so the same code runs in CI with two CPU processes.

Rank 0 is the trainer's face to the mesh (buffer reads and acks, weight pushes, metrics); the
other ranks receive each step's samples from it as protobuf bytes over the process group, and
its decision before every push and save (`ranks.py`).
Checkpoints and weight pushes go through `torch.distributed.checkpoint`'s state-dict API with
`full_state_dict=True`: the state is gathered world-size-independent, so a run saved on N
processes resumes on M. An FP8 or int4 push is quantized shard by shard instead (`wire_state`):
each rank quantizes its rows and rank 0 gathers the wire form, never the fp32 state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


@dataclass
class Parallel:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def broadcast_floats(self, values: list[float] | None) -> list[float]:
        """Rank 0's list on every rank."""
        n = torch.tensor([len(values) if self.is_main and values is not None else 0], device=self.device)
        dist.broadcast(n, src=0)
        t = torch.zeros(int(n.item()), dtype=torch.float64, device=self.device)
        if self.is_main:
            t.copy_(torch.tensor(values, dtype=torch.float64))
        dist.broadcast(t, src=0)
        return t.cpu().tolist()

    def share_flag(self, value: bool | None) -> bool:
        """Rank 0's yes/no on every rank: how followers learn what rank 0 decided to do next
        (push, save), so a collective is joined by all ranks or by none."""
        if not self.enabled:
            return bool(value)
        return bool(self.broadcast_floats([float(bool(value))] if self.is_main else None)[0])


def init_parallel(device: torch.device) -> Parallel:
    """Join the process group when started by torchrun; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Parallel(device=device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return Parallel(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def shard_model(
    model: torch.nn.Module,
    par: Parallel,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    full_precision: list[str] | tuple[str, ...] = (),
) -> torch.nn.Module:
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, lm_head).

    Applied to the meta-device model before anything is allocated (`hf.load_model(shard=...)`),
    so each rank only ever allocates and reads its own shard.

    `param_dtype=torch.bfloat16` (`--bf16`): the sharded parameters stay what they are (the fp32
    masters AdamW steps) and FSDP2 all-gathers bf16 copies for forward and backward, reducing
    gradients in fp32 (`MixedPrecisionPolicy`), the multi-process form of `precision.py`.
    `cpu_offload` (--optimizer-cpu-offload, --ref-offload): the shards, their gradients and so
    AdamW's moments live on the CPU (FSDP2's `CPUOffloadPolicy`); each unit is copied to the
    device for its forward and backward and AdamW steps on the CPU.
    `full_precision`: modules (by name) made units of their own and gathered in the masters' dtype
    whatever `param_dtype` says: the projections --int4-qat / --fp8-format quantize in their forward
    (`quantized.quantize_in_forward`), whose quantizer must see the masters themselves.
    """
    if not par.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(par.device.type, (par.world_size,))
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
    )
    offload = CPUOffloadPolicy() if cpu_offload and par.device.type == "cuda" else OffloadPolicy()
    for name in full_precision:  # inner units first: FSDP2 nests bottom-up
        fully_shard(model.get_submodule(name), mesh=mesh, offload_policy=offload)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return model


def stream_layers(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """--ref-offload in one process: the decoder layers' weights stay in (pinned) CPU memory and
    each layer is copied to `device` just for its forward, then dropped there again; the
    embeddings, final norm and LM head stay on `device`. For a forward-only model (the reference)."""
    if device.type != "cuda":
        return model.to(device)
    for name, module in model.named_children():
        if name != "model":
            module.to(device)
    for name, module in model.model.named_children():
        if name != "layers":
            module.to(device)
    for layer in model.model.layers:
        params = list(layer.parameters())
        host = [p.data.cpu().pin_memory() for p in params]
        for p, h in zip(params, host, strict=True):
            p.data = h

        def fetch(_module, _args, _params=params, _host=host):
            for p, h in zip(_params, _host, strict=True):
                p.data = h.to(device, non_blocking=True)

        def drop(_module, _args, _out, _params=params, _host=host):
            for p, h in zip(_params, _host, strict=True):
                p.data = h

        layer.register_forward_pre_hook(fetch)
        layer.register_forward_hook(drop)
    return model


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, unsharded, on the CPU (a collective: every rank calls it; rank 0 uses it)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state keyed by parameter name, unsharded (a collective, like `full_model_state`)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def wire_state(model: torch.nn.Module, par: Parallel, fmt: str, int4_targets: str) -> dict:
    """The weights of a push in format `fmt` ("fp8", "int4"), on rank 0's CPU, quantized shard by
    shard: each rank quantizes the rows of every FP8 / int4 matrix it holds, on its own device, and
    rank 0 gathers the quantized rows and scales (`packer.Quantized`: 1 byte a weight, half a byte
    for int4, instead of the fp32 master's 4); the tensors that travel as bf16 are cast before they
    are gathered (2 bytes). The bytes `pack` then writes are those it writes from the gathered
    fp32 state (`full_model_state`), which never exists here: rank 0 holds the version in its wire
    size, every other rank at most one tensor's gathered rows. A collective; {} on other ranks.

    FSDP2 gives rank r rows [r c, (r + 1) c) of each matrix, c = ceil(rows / world). int4 groups
    run along a row, so any row shard quantizes alone; an FP8 block spans 128 rows, so a matrix whose
    c is not a multiple of 128 is gathered in fp32 and quantized by the packer, as before. Stacked
    MoE experts [E, out, in] are sharded along E: a rank's rows are whole experts, each with its
    own FP8 blocks, so they always quantize alone (scales [c, out/128, in/128], gathered by expert).
    """
    from torch.distributed.tensor import DTensor

    from slipstream.quant import BLOCK, int4_names, quantize_blockwise, quantize_int4
    from slipstream.weights.packer import Quantized, wire_dtype

    params = dict(model.named_parameters())
    int4 = int4_names(((n, p.shape) for n, p in params.items()), int4_targets) if fmt == "int4" else set()
    out = {}
    for name, param in params.items():
        local = param.to_local() if isinstance(param, DTensor) else param
        rows, chunk = param.shape[0], -(-param.shape[0] // par.world_size)
        dtype = wire_dtype(name, param.shape, fmt, int4)
        quantize = {"float8_e4m3fn": quantize_blockwise, "int4": quantize_int4}.get(dtype)
        if dtype == "float8_e4m3fn" and param.dim() == 2 and chunk % BLOCK:
            quantize = None  # this rank's rows cut through an FP8 block
            dtype = "float32"
        with torch.no_grad():
            # on the device (NCCL gathers device tensors), also for shards offloaded to the CPU
            padded = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype, device=par.device)
            padded[: local.shape[0]] = local
            if quantize is None:
                wire = padded.to(torch.bfloat16) if dtype == "bfloat16" else padded
                out[name] = _gather_rows(wire, par, rows)
                continue
            values, scales = quantize(padded)
            # FP8 scales have a row per 128 rows of a matrix, one per expert of stacked experts
            scale_rows = -(-rows // BLOCK) if dtype == "float8_e4m3fn" and param.dim() == 2 else rows
            # as bytes: a collective backend need not know float8
            values = _gather_rows(values.view(torch.uint8), par, rows)
            scales = _gather_rows(scales, par, scale_rows)
        if par.is_main:
            values = values.view(torch.float8_e4m3fn) if dtype == "float8_e4m3fn" else values
            out[name] = Quantized(values, scales, shape=param.shape, dtype=dtype)
    return out if par.is_main else {}


def _gather_rows(t: torch.Tensor, par: Parallel, rows: int) -> torch.Tensor | None:
    """Every rank's equally sized `t`, concatenated along dim 0 and cut to `rows`, on rank 0's CPU."""
    parts = [torch.empty_like(t) for _ in range(par.world_size)] if par.is_main else None
    dist.gather(t.contiguous(), parts, dst=0)
    return torch.cat(parts)[:rows].cpu() if parts is not None else None


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_state: dict,
    optim_state: dict | None,
) -> None:
    """Scatter full (world-size-independent) states into this rank's shards."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def replicate(params: list[torch.Tensor], par: Parallel) -> None:
    """Rank 0's values of `params` on every rank (a collective): a small module kept whole on
    every rank beside the sharded model (LoRA's adapters) starts identical."""
    if not par.enabled or not params:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(par.device)
        dist.broadcast(flat, src=0)
        for p, v in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.copy_(v.view_as(p))


def average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """Average the replicas' gradients of `params` over ranks (a collective: every rank calls it),
    as FSDP does for the sharded ones; a parameter without a gradient contributes zeros. Each
    rank's loss carries the world-size factor that the average takes out again."""
    if world_size == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    for p, g in zip(params, flat.split([q.numel() for q in params]), strict=True):
        p.grad = g.view_as(p)


def broadcast_bytes(payload: bytes | None, par: Parallel) -> bytes:
    """Rank 0's bytes on every rank (protobuf payloads: no pickling across processes)."""
    if not par.enabled:
        assert payload is not None
        return payload
    dev = par.device  # NCCL broadcasts device tensors; gloo CPU ones
    size = torch.tensor(
        [len(payload) if par.is_main and payload is not None else 0], dtype=torch.long, device=dev
    )
    dist.broadcast(size, src=0)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    if par.is_main:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return buf.cpu().numpy().tobytes()


def shutdown(par: Parallel) -> None:
    if par.enabled and dist.is_initialized():
        dist.destroy_process_group()
