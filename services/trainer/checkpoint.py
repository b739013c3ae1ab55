"""Checkpoints: a Hugging Face model directory plus the trainer's state, all in safetensors/JSON.

    checkpoints/step_000010/
        config.json, model.safetensors, tokenizer files   <- loadable by transformers as is
        optimizer.safetensors                              <- AdamW moments, per parameter name
        trainer_state.json                                 <- step, policy version, RNG, counters
    checkpoints/latest                                     <- name of the newest complete one

Nothing is pickled: a checkpoint from an untrusted place cannot run code when loaded. A
checkpoint directory is written under a temporary name and renamed when complete, so
`latest` never points at half a checkpoint.
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

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for p, state in optimizer.state.items():
        name = names[id(p)]
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{name}::{key}"] = t.detach().cpu().contiguous()
    return out


def save_checkpoint(
    save_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    tokenizer_dir: str | None = None,
) -> Path:
    save_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = save_dir / name
    tmp = save_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    if tokenizer_dir:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
    save_file(_optimizer_tensors(model, optimizer), str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state().tolist()}
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "rng": rng}) + "\n")
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
    """Restore optimizer moments and RNG into an already-loaded model; return the saved state."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, field = key.split("::", 1)
        p = params[name]
        optimizer.state[p][field] = value.to(p.device) if field != "step" else value
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    return state
