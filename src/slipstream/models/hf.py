"""Hugging Face checkpoints in and out: `config.json`, `*.safetensors`, tokenizer files.

Users bring their own checkpoints, so this reads what `save_pretrained` writes (one file or
shards) and writes what `from_pretrained` reads. Only safetensors: a pickle can run code. Problems
surface as `FileNotFoundError`/`ValueError` naming the path, which the CLI prints as one line.

Loading builds the model on the meta device and reads the checkpoint tensors into it, so a
large model is never allocated twice (random init then overwrite); a sharded trainer process
reads only its own rows of each tensor (`load_model(shard=...)`).

Mixture-of-experts weights: published Qwen3-MoE checkpoints (and transformers 5's save_pretrained)
name every expert's projections, `mlp.experts.<e>.{gate,up,down}_proj.weight`; the model holds
them stacked (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I], the
layout transformers 5 keeps in memory). Loading reads either layout; saving writes the published
per-expert one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from slipstream.models.config import ModelConfig
from slipstream.models.decoder import CausalLM, init_weights_

# Buffers some older exports carry; recomputed here, never needed from disk.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


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


class _Checkpoint:
    """A checkpoint's tensors under the model's names, read lazily and by rows.

    Nothing is read until asked for, and then only the rows asked for (`safe_open`'s slices
    read just those bytes), so a rank that holds rows a..b of a parameter never materialises
    the rest. Per-expert MoE tensors are read as the model's stacked ones (rows = experts)."""

    def __init__(self, path: Path, config: ModelConfig) -> None:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in checkpoint directory {path}")
        self.path, self.handles, self.shapes = path, {}, {}
        for file in files:
            try:
                f = safe_open(file, framework="pt", device="cpu")
                for name in f.keys():
                    if not name.endswith(_IGNORED_SUFFIXES):
                        self.handles[name] = f
                        self.shapes[name] = tuple(f.get_slice(name).get_shape())
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise ValueError(f"cannot read safetensors file {file}: {e}") from e
        if config.tie_word_embeddings:
            self.shapes.pop("lm_head.weight", None)  # some exports write the tied copy too
        self.stacked: dict[str, list[list[str]]] = {}  # model name -> per expert, the names to cat
        for layer in config.moe_layers:
            prefix = f"model.layers.{layer}.mlp.experts."
            experts = range(config.num_experts)
            for stacked, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                parts = [[f"{prefix}{e}.{p}.weight" for p in projs] for e in experts]
                if all(n in self.shapes for row in parts for n in row):
                    first = [self.shapes.pop(n) for row in parts for n in row][: len(projs)]
                    self.shapes[prefix + stacked] = (len(parts), sum(s[0] for s in first), first[0][1])
                    self.stacked[prefix + stacked] = parts

    def read(self, name: str, rows: slice = slice(None)) -> torch.Tensor:
        """Rows `rows` (along the first dimension) of the model's tensor `name`."""
        if name in self.stacked:
            parts = self.stacked[name][rows]
            return torch.stack([torch.cat([self.handles[n].get_tensor(n) for n in row]) for row in parts])
        return self.handles[name].get_slice(name)[rows]

    def check(self, model: CausalLM) -> None:
        expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied: once
        missing, unexpected = (
            sorted(expected.keys() - self.shapes.keys()),
            sorted(self.shapes.keys() - expected.keys()),
        )
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {self.path} does not match its {model.config.model_type} config: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name, shape in expected.items():
            if self.shapes[name] != shape:
                raise ValueError(
                    f"checkpoint {self.path}: {name} has shape {self.shapes[name]}, config implies {shape}"
                )


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """The tensor this process holds of `param` and which rows of the full one they are: all of
    them, or under FSDP2 (a DTensor sharded on dim 0) this rank's chunk."""
    from torch.distributed.tensor import DTensor  # imported under FSDP2 only (it pulls in sympy)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param.data, slice(None)
    local = param.to_local()
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(o for o in offset[1:]):
        raise ValueError(f"sharded loading reads row shards only, got offsets {offset}")
    return local, slice(offset[0], offset[0] + local.shape[0])


class _CheapMeta(TorchFunctionMode):
    """Building a model on the meta device and allocating it, without the two ops that are slow
    there for nothing: nn.Embedding's random init (`normal_` on meta imports torch._dynamo, ~1 CPU
    s) is skipped, and a meta parameter's `empty_like` (which imports sympy, ~0.4 s) becomes
    `torch.empty` of its shape. Every process that loads a model pays them otherwise. A torch
    function mode, so only this thread's calls are affected."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
        if func is torch.nn.init.normal_ and tensor.is_meta:
            return tensor
        if func is torch.empty_like and tensor.is_meta and not kwargs.keys() - {"device"}:
            return torch.empty(tensor.shape, dtype=tensor.dtype, device=kwargs.get("device", "meta"))
        return func(*args, **kwargs)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    shard: Callable[[CausalLM], CausalLM] | None = None,
) -> CausalLM:
    """The model in `path` (config.json + every *.safetensors there), on `device` in `dtype`.

    Built on the meta device, so nothing is allocated twice (random init then overwrite).
    `shard` (FSDP2's `fully_shard` per layer, `trainer.parallel`) is applied to the meta model
    first; each process then allocates and reads only its own rows of every parameter, so no
    process ever holds the full model."""
    path = Path(path)
    config = load_config(path)
    ckpt = _Checkpoint(path, config)
    with torch.device("meta"), _CheapMeta():
        model = CausalLM(config).to(dtype)
    ckpt.check(model)
    if shard is not None:
        model = shard(model)
        model.to_empty(device=device)
    else:
        with _CheapMeta():
            model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            local, rows = _local_rows(param) if shard is not None else (param.data, slice(None))
            try:
                local.copy_(ckpt.read(name, rows))
            except Exception as e:  # a file truncated after its header
                raise ValueError(f"cannot read {name} from checkpoint {path}: {e}") from e
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
    init_weights_(model, seed)
    return model


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (`transformers.AutoTokenizer`), imported lazily: it is slow."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
