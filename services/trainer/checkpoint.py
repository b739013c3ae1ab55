"""Checkpoints: a Hugging Face model directory plus the trainer's state, all in safetensors/JSON.

    checkpoints/step_000010/
        config.json, model.safetensors, tokenizer files   <- loadable by transformers as is
        optimizer.safetensors                              <- AdamW moments, per parameter name
        trainer_state.json                                 <- step, policy version, RNG, counters
    checkpoints/latest                                     <- name of the newest complete one

States are gathered and scattered with `torch.distributed.checkpoint`'s state-dict API in
full (unsharded) form, so a checkpoint written by N FSDP2 ranks loads on M ranks or on one
process. Storage is safetensors + JSON rather than DCP's own files because DCP's metadata is
a pickle: nothing a trainer loads from disk can run code. A checkpoint directory is written
under a temporary name and renamed when complete, so `latest` never points at half a
checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slipstream.models.hf import save_model

from .parallel import Parallel, full_model_state, full_optimizer_state, load_full_state

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
SEP = "::"  # optimizer tensor keys: "<parameter name>::<state key>"


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


def save_checkpoint(
    save_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    tokenizer_dir: str | None = None,
    par: Parallel | None = None,
) -> Path:
    """Write one checkpoint (a collective under FSDP2: every rank calls it, rank 0 writes)."""
    par = par or Parallel()
    model_state = full_model_state(model)
    optim_state = full_optimizer_state(model, optimizer)  # both collectives; only rank 0 gets data
    name = f"step_{step:06d}"
    final = save_dir / name
    if not par.is_main:
        return final
    optim_tensors, param_groups = _flatten_optimizer(optim_state)
    save_dir.mkdir(parents=True, exist_ok=True)
    tmp = save_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, state_dict=model_state)
    if tokenizer_dir:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
    save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state().tolist()}
    meta = {**state, "step": step, "rng": rng, "param_groups": param_groups, "world_size": par.world_size}
    (tmp / "trainer_state.json").write_text(json.dumps(meta) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = save_dir / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, save_dir / "latest")
    return final


def resolve_checkpoint(path: str) -> Path:
    """`--load` may name a checkpoint directory or the folder holding `latest`."""
    p = Path(path)
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--load {path}: no checkpoint (trainer_state.json) there")
    return p


def load_trainer_state(
    ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore weights, optimizer moments and RNG into a (possibly sharded) model; return the state."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    weights = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        if f.name != "optimizer.safetensors":
            weights.update(load_file(str(f)))
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied
    osd = _unflatten_optimizer(load_file(str(ckpt / "optimizer.safetensors")), state["param_groups"])
    load_full_state(model, optimizer, weights, osd)
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    return state
