"""LoRA (`--lora-rank`): low-rank adapters on the policy's linear projections, through `peft`.

`peft.inject_adapter_in_model` wraps each targeted `nn.Linear` of the shared model code by
module name (`q_proj`, `gate_proj`, ...; `--target-modules`, PEFT's names, `all-linear` = every
decoder projection), which is all it needs: the decoder calls its projections as modules. The
wrapped layer computes W x + (alpha / r) B A dropout(x), B zero at the start, so the first
step's policy is the base model's. Only the adapters require gradients, so only they get AdamW
moments; the base weights stay frozen in the dtype they were loaded in (bf16 under `--bf16`:
no fp32 master copy of a weight that never moves, and the adapters, which do, stay float32).

What leaves the trainer is always the merged policy, W + (alpha / r) B A, under the
checkpoint's own names (`merged`): the weight push, so the rollout engines stay LoRA-unaware
and FP8 quantizes exactly the weights that are sampled from (sending only the adapters would be
rank x (in + out) per projection instead of in x out, but every engine would need LoRA GEMMs
or a merge of its own, and an FP8 engine a re-quantization after it anyway), and a checkpoint's
model.safetensors, so a checkpoint is still a Hugging Face model directory. A checkpoint also
holds the adapters in PEFT's own format (`adapter/adapter_model.safetensors` +
`adapter/adapter_config.json`, loadable with `PeftModel.from_pretrained` on the base model),
which is what a resumed run reads back onto the base model (--hf-checkpoint).

Under torchrun (FSDP2) the base model is loaded and sharded exactly as without LoRA (each rank
reads and holds its rows, `parallel.shard_model`) and the adapters are injected around the
sharded projections afterwards, whole on every rank (`parallel.replicate` makes rank 0's initial
values everyone's). Replicated, not sharded: they are rank x (in + out) per projection, so a
replica costs little, and FSDP's all-gather, reduce-scatter and sharded AdamW state would buy
nothing while the loading path (which reads the base checkpoint by FSDP's rows) stays untouched.
Each rank trains them on its own micro-batches and `parallel.average_gradients` averages their
gradients before clipping, as FSDP averages the sharded weights', so every rank steps the same
adapters to the same values. The push and the checkpoint gather the full state as they do
without LoRA (`full_model_state`: the sharded base gathered, the adapters as they are), so both
send and write what one process does.

LoRA's state-dict names are the wrapped model's: `...q_proj.base_layer.weight`,
`...q_proj.lora_A.default.weight`; PEFT's files drop the adapter name and prefix
`base_model.model.` (`to_peft_names` / `from_peft_names`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

ADAPTER_DIR = "adapter"
ADAPTER = "default"  # peft's adapter name inside the model
_PEFT_PREFIX = "base_model.model."
# --target-modules all-linear: every projection of a decoder layer (the LM head is read by
# weight, not called, so an adapter there would never run: refused by name).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_modules(spec: str) -> list[str]:
    """`--target-modules` as a list of module names (comma-separated, or all-linear)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all-linear"]:
        return list(ALL_LINEAR)
    return names


def lora_config(rank: int, alpha: float, dropout: float, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")


def apply_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], base: str = ""
) -> nn.Module:
    """Wrap `targets` with adapters (in place) and freeze everything else; returns `model`.
    `base`: the base model's path, recorded in the adapter config as PEFT does."""
    from peft import inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(targets) - present)
    if unknown or "lm_head" in targets:
        raise ValueError(
            f"--target-modules: {unknown or ['lm_head']} not among the model's linear projections "
            f"{sorted(present - {'lm_head'})} (or all-linear)"
        )
    model.requires_grad_(False)
    config = lora_config(rank, alpha, dropout, targets)
    config.base_model_name_or_path = base
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
        if ".lora_" in name:
            p.data = p.data.float()  # the adapters are the trained (master) weights
    return model


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trained parameters: every adapter's A and B, in model order."""
    return [p for name, p in model.named_parameters() if ".lora_" in name]


def config_of(model: nn.Module):
    """The model's LoRA config (peft's LoraConfig), or None for a model without adapters."""
    return getattr(model, "peft_config", {}).get(ADAPTER)


def policy_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The policy a state dict of `model` holds, under the checkpoint's names: merged under LoRA."""
    config = config_of(model)
    return state if config is None else merged(state, config.lora_alpha / config.r)


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every adapter bypassed while inside (LoRA's reference model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def merged(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA-wrapped model's state dict -> the merged policy under the checkpoint's names."""
    out = {}
    for name, t in state.items():
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            out[name] = t
            continue
        prefix, leaf = name.split(".base_layer.")
        if leaf == "weight":
            a = state[f"{prefix}.lora_A.{ADAPTER}.weight"].float()
            b = state[f"{prefix}.lora_B.{ADAPTER}.weight"].float()
            t = (t.float() + (b @ a) * scaling).to(t.dtype)
        out[f"{prefix}.{leaf}"] = t
    return out


def adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".lora_" in k}


def to_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model.layers.0.self_attn.q_proj.lora_A.default.weight` -> PEFT's file name for it."""
    return {_PEFT_PREFIX + k.replace(f".{ADAPTER}.", "."): v for k, v in adapters(state).items()}


def from_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        name = k.removeprefix(_PEFT_PREFIX)
        for ab in ("lora_A", "lora_B"):
            name = name.replace(f".{ab}.weight", f".{ab}.{ADAPTER}.weight")
        out[name] = v
    return out


def save_adapter(path: Path, state: dict[str, torch.Tensor], config) -> None:
    """PEFT's adapter files in `path` (adapter_model.safetensors, adapter_config.json)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in to_peft_names(state).items()}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    d = config.to_dict()
    d["target_modules"] = sorted(d["target_modules"])  # a set in peft's config object
    d["task_type"] = "CAUSAL_LM"
    (path / "adapter_config.json").write_text(json.dumps(d, indent=2, default=str) + "\n")


def load_adapter(path: Path) -> dict[str, torch.Tensor]:
    """The adapters of a checkpoint's PEFT files, under the wrapped model's names."""
    from safetensors.torch import load_file

    return from_peft_names(load_file(str(path / "adapter_model.safetensors")))
