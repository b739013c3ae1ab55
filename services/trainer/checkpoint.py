"""Checkpoints: a Hugging Face model directory plus the trainer's state, all in safetensors/JSON.

    checkpoints/step_000010/
        config.json, model.safetensors, tokenizer files   <- loadable by transformers as is
        adapter/adapter_model.safetensors, adapter_config.json  <- under --lora-rank: the adapters in
                                                              PEFT's format (model.safetensors then
                                                              holds the merged weights; lora.py)
        optimizer/optimizer.safetensors                    <- AdamW moments, per parameter name (in a
                                                              folder: a model loader reads every
                                                              *.safetensors beside config.json);
                                                              over 1 GiB, optimizer-0000k-of-0000n
                                                              shards, written side by side
        draft/config.json, model.safetensors               <- under --enable-mtp-training: the draft
                                                              head, a directory
                                                              --speculative-draft-model-path loads
        draft/optimizer/optimizer.safetensors              <- its own AdamW's moments
        trainer_state.json                                 <- step, policy version, RNG, counters,
                                                              groups trained, steps since the last one,
                                                              the lr schedule's position (lr_scheduler)
    checkpoints/latest                                     <- name of the newest complete one

States are gathered and scattered with `torch.distributed.checkpoint`'s state-dict API in
full (unsharded) form, so a checkpoint written by N FSDP2 ranks loads on M ranks or on one
process. Storage is safetensors + JSON rather than DCP's own files because DCP's metadata is
a pickle: nothing a trainer loads from disk can run code. A checkpoint directory is written
under a temporary name and renamed when complete, so `latest` never points at half a
checkpoint, nor ever moves back to an older step (a trainer started again without --load must
not shadow the run's newest checkpoint). Redis hears about the entries a checkpoint trained only
after it is renamed (`checkpointer.py`): the checkpoint is the truth about what was trained,
Redis follows it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slipstream.faults import crash_point
from slipstream.models.draft import save_draft
from slipstream.models.hf import save_model

from . import lora
from .parallel import Parallel, full_model_state, full_optimizer_state, load_full_state
from .schedule import LRScheduler

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
OPTIMIZER = "optimizer/optimizer.safetensors"
DRAFT_DIR = "draft"
SEP = "::"  # optimizer tensor keys: "<parameter name>::<state key>"
Draft = tuple[torch.nn.Module, torch.optim.Optimizer]  # a draft head and its own AdamW
log = logging.getLogger("slipstream.trainer")


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{name}{SEP}{key}"] = t.detach().cpu().contiguous()
    return tensors, osd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit(SEP, 1)
        state.setdefault(name, {})[field] = value
    return {"state": state, "param_groups": param_groups}


def rng_state() -> dict[str, Any]:
    """Every random generator the trainer may draw from, as JSON (torch CPU, CUDA, random, numpy)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state().tolist(), "python": _jsonable(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    np = sys.modules.get("numpy")  # only if something imported it: its state is then worth keeping
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        out["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    return out


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if "python" in rng:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])
    if "numpy" in rng:
        import numpy as np

        name, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def save_checkpoint(
    save_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    tokenizer_dir: str | None = None,
    par: Parallel | None = None,
    scheduler: LRScheduler | None = None,
    draft: Draft | None = None,
) -> Path:
    """Write one checkpoint (a collective under FSDP2: every rank calls it, rank 0 writes);
    `draft`: the draft head --enable-mtp-training trains, and its optimizer."""
    par = par or Parallel()
    model_state = full_model_state(model)
    optim_state = full_optimizer_state(model, optimizer)  # both collectives; only rank 0 gets data
    draft_optim = full_optimizer_state(*draft) if draft is not None else None
    name = f"step_{step:06d}"
    final = save_dir / name
    if not par.is_main:
        return final
    optim_tensors, param_groups = _flatten_optimizer(optim_state)
    save_dir.mkdir(parents=True, exist_ok=True)
    tmp = save_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # The big files are written side by side (safetensors serializes without the GIL): a final
    # checkpoint is what a run's last seconds wait on, several GB for a 0.6B model.
    policy = lora.policy_weights(model, model_state)  # under LoRA the merged weights
    writes = [partial(save_model, model, tmp, state_dict=policy)]
    writes += _optimizer_writes(optim_tensors, tmp / OPTIMIZER)
    meta = {
        **state,
        "step": step,
        "rng": rng_state(),
        "param_groups": param_groups,
        "world_size": par.world_size,
    }
    if draft is not None and draft_optim is not None:
        draft_tensors, meta["draft_param_groups"] = _flatten_optimizer(draft_optim)
        writes.append(partial(save_draft, draft[0], tmp / DRAFT_DIR))
        writes += _optimizer_writes(draft_tensors, tmp / DRAFT_DIR / OPTIMIZER)
    if lora.config_of(model) is not None:
        writes.append(partial(lora.save_adapter, tmp / lora.ADAPTER_DIR, model_state, lora.config_of(model)))
    _side_by_side(writes)
    if tokenizer_dir:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
    if scheduler is not None:
        meta["lr_scheduler"] = scheduler.state_dict()
    (tmp / "trainer_state.json").write_text(json.dumps(meta) + "\n")
    _same_mode(tmp, _file_mode())
    _fsync_tree(tmp)
    crash_point("mid_checkpoint", step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if latest_step(save_dir) <= step:  # `latest` never moves back to an older step
        latest_tmp = save_dir / ".latest.tmp"
        latest_tmp.write_text(name + "\n")
        os.replace(latest_tmp, save_dir / "latest")
    _fsync(save_dir)  # the renames themselves: a checkpoint Redis is told about must survive power loss
    return final


SHARD_BYTES = 1 << 30  # optimizer files are cut at ~1 GiB, so several writers share the work


def _optimizer_writes(tensors: dict[str, torch.Tensor], path: Path) -> list[Callable[[], None]]:
    """Writers of the optimizer tensors: `path` itself, or `optimizer-0000k-of-0000n.safetensors`
    beside it when they exceed SHARD_BYTES (each shard a whole number of tensors)."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    n = max(1, min(os.cpu_count() or 1, -(-total // SHARD_BYTES)))
    path.parent.mkdir(parents=True, exist_ok=True)
    if n == 1:
        return [partial(save_file, tensors, str(path))]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    sizes = [0] * n
    for key, t in sorted(tensors.items(), key=lambda kv: -kv[1].numel() * kv[1].element_size()):
        i = sizes.index(min(sizes))  # the emptiest shard: sizes come out within one tensor
        shards[i][key] = t
        sizes[i] += t.numel() * t.element_size()
    stem = path.stem
    return [
        partial(save_file, shard, str(path.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors")))
        for i, shard in enumerate(shards)
    ]


def _load_optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every optimizer file in `path`'s folder (one file, or the shards `_optimizer_writes` cut)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.parent.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if not tensors:
        raise FileNotFoundError(f"no optimizer state (*.safetensors) in {path.parent}")
    return tensors


def _side_by_side(writes: list[Callable[[], None]]) -> None:
    with ThreadPoolExecutor(len(writes), thread_name_prefix="checkpoint") as pool:
        for done in [pool.submit(w) for w in writes]:
            done.result()  # the first error, raised here


def _file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0644 under umask 022)."""
    try:  # Linux: read it, rather than set it, which would race other threads' files
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _same_mode(d: Path, mode: int) -> None:
    """Every file of a checkpoint readable alike: safetensors writes 0600 and copy2 keeps a
    tokenizer file's own mode, while the rest are created under the umask."""
    for f in d.rglob("*"):
        if f.is_file():
            f.chmod(mode)


def latest_step(save_dir: Path) -> int:
    """The step `save_dir/latest` names; -1 when there is none (or it names no step)."""
    try:
        return int((save_dir / "latest").read_text().strip().removeprefix("step_"))
    except (OSError, ValueError):
        return -1


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(d: Path) -> None:
    """Every file under `d` durable (side by side: each waits on the disk), then the folders."""
    paths = list(d.rglob("*"))
    _side_by_side([partial(_fsync, f) for f in paths if f.is_file()])
    for folder in sorted((p for p in paths if p.is_dir()), key=lambda p: -len(p.parts)) + [
        d
    ]:  # deepest first
        _fsync(folder)


def resolve_checkpoint(path: str) -> Path:
    """`--load` may name a checkpoint directory or the folder holding `latest`."""
    p = Path(path)
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--load {path}: no checkpoint (trainer_state.json) there")
    return p


def load_trainer_state(
    ckpt: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None = None,
    draft: Draft | None = None,
) -> dict[str, Any]:
    """Restore weights, optimizer moments, the lr schedule's position and RNG into a (possibly
    sharded) model, and the draft head and its moments when `draft` is given and the checkpoint
    has them (one written without --enable-mtp-training leaves the draft where it started, said
    in the log); return the state."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if lora.config_of(model) is not None:  # the adapters, back onto the base model
        if not (ckpt / lora.ADAPTER_DIR / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(
                f"--load {ckpt}: no LoRA adapters ({lora.ADAPTER_DIR}/) there, but --lora-rank is set"
            )
        weights = lora.load_adapter(ckpt / lora.ADAPTER_DIR)
    else:
        weights = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            if f.name != "optimizer.safetensors":  # where checkpoints before the optimizer/ folder kept it
                weights.update(load_file(str(f)))
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied
    osd = _unflatten_optimizer(_load_optimizer_tensors(ckpt / OPTIMIZER), state["param_groups"])
    load_full_state(model, optimizer, weights, osd)
    if draft is not None:
        _load_draft(ckpt, state, *draft)
    if scheduler is not None and "lr_scheduler" in state:  # older checkpoints: a constant lr
        scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(state["rng"])
    return state


def _load_draft(
    ckpt: Path, state: dict[str, Any], head: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    d = ckpt / DRAFT_DIR
    if not (d / "model.safetensors").is_file() or "draft_param_groups" not in state:
        log.warning(
            "--load %s: no draft head there (saved without --enable-mtp-training): the draft starts afresh",
            ckpt,
        )
        return
    weights = load_file(str(d / "model.safetensors"))
    osd = _unflatten_optimizer(_load_optimizer_tensors(d / OPTIMIZER), state["draft_param_groups"])
    load_full_state(head, optimizer, weights, osd)
