"""Hugging Face checkpoints in and out: `config.json`, `*.safetensors`, tokenizer files.

Users bring their own checkpoints, so this reads what `save_pretrained` writes (one file or
shards) and writes what `from_pretrained` reads. Only safetensors: a pickle can run code. Problems
surface as `FileNotFoundError`/`ValueError` naming the path, which the CLI prints as one line.

Loading builds the model on the meta device and assigns the checkpoint tensors into it, so a
large model is never allocated twice (random init then overwrite).

Mixture-of-experts weights: published Qwen3-MoE checkpoints (and transformers 5's save_pretrained)
name every expert's projections, `mlp.experts.<e>.{gate,up,down}_proj.weight`; the model holds
them stacked (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I], the
layout transformers 5 keeps in memory). Loading reads either layout; saving writes the published
per-expert one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slipstream.models.config import ModelConfig
from slipstream.models.decoder import CausalLM

# Buffers some older exports carry; recomputed here, never needed from disk.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def stack_experts(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint names -> the model's stacked tensors (in place; other names untouched)."""
    for layer in config.moe_layers:
        prefix = f"model.layers.{layer}.mlp.experts."
        if f"{prefix}0.gate_proj.weight" not in state:
            continue  # already stacked (transformers 5's in-memory names), or missing (reported later)
        stacked = {}
        for proj in _EXPERT_PROJS:
            names = [f"{prefix}{e}.{proj}.weight" for e in range(config.num_experts)]
            if any(name not in state for name in names):
                continue  # reported as missing/unexpected by the caller
            stacked[proj] = torch.stack([state.pop(name) for name in names])
        if "gate_proj" in stacked and "up_proj" in stacked:
            state[f"{prefix}gate_up_proj"] = torch.cat([stacked["gate_proj"], stacked["up_proj"]], dim=1)
        if "down_proj" in stacked:
            state[f"{prefix}down_proj"] = stacked["down_proj"]
    return state


def unstack_experts(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's stacked expert tensors -> the per-expert names published checkpoints use."""
    for layer in config.moe_layers:
        prefix = f"model.layers.{layer}.mlp.experts."
        gate, up = state.pop(f"{prefix}gate_up_proj").chunk(2, dim=1)
        down = state.pop(f"{prefix}down_proj")
        for proj, stacked in zip(_EXPERT_PROJS, (gate, up, down), strict=True):
            for e in range(config.num_experts):
                state[f"{prefix}{e}.{proj}.weight"] = stacked[e].contiguous()
    return state


def load_config(path: str | Path) -> ModelConfig:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    try:
        d = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed {config_path}: {e}") from e
    try:
        return ModelConfig.from_hf_dict(d)
    except (KeyError, TypeError, ValueError) as e:  # a missing key, a wrong type, or what we refuse
        raise ValueError(f"{config_path}: {e}") from e


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> CausalLM:
    """The model in `path` (config.json + every *.safetensors there), on `device` in `dtype`."""
    path = Path(path)
    config = load_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in checkpoint directory {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if not name.endswith(_IGNORED_SUFFIXES):
                        state[name] = f.get_tensor(name).to(dtype)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"cannot read safetensors file {file}: {e}") from e

    stack_experts(state, config)
    with torch.device("meta"):
        model = CausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some exports write the tied copy too
    expected = {name for name, _ in model.named_parameters()}  # tied lm_head appears once, as embed
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its {config.model_type} config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    shapes = dict(model.state_dict().items())
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(shapes[name].shape):
            raise ValueError(
                f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                f"config implies {tuple(shapes[name].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def save_model(model: CausalLM, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `config.json` + `model.safetensors` (a tied lm_head is left out, as HF does).

    `state_dict` overrides the model's own tensors: a sharded trainer passes the full state it
    gathered (the model's own parameters are then only its shards).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    source = model.state_dict() if state_dict is None else state_dict
    state = unstack_experts({name: t.detach().contiguous().cpu() for name, t in source.items()}, model.config)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = next(iter(state.values())).dtype
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def init_model(config: ModelConfig, seed: int = 0) -> CausalLM:
    """A randomly initialised model (normal std 0.02 for matrices, ones for norms, like HF)."""
    model = CausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (`transformers.AutoTokenizer`), imported lazily: it is slow."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
