"""The speculative draft: an MTP/EAGLE-style head on the target's last hidden state.

A draft module at position i reads two things the target already has, its final hidden state
h_i (what predicts token i+1) and the embedding of token i+1, and predicts token i+2: DeepSeek-V3's
multi-token-prediction module, `eh_proj(cat(enorm(embed(x_{i+1})), hnorm(h_i)))` -> one decoder
layer -> `shared_head.norm` -> the target's LM head. The embedding and the LM head are the
target's (shared, never copied), so a draft is a few percent of the target's bytes.

`num_layers` modules run in sequence at the same position: module m>0 takes module m-1's output
as its hidden state and the same token's embedding again, and only the last one's output reaches
the LM head. One module is what published MTP checkpoints carry and what slime's
`--mtp-num-layers 1` trains. The engine drafts with the head autoregressively (EAGLE): the head's
own output stands in for the target's hidden state at the next position, so the head also learns
to regress the target's next hidden state (`draft_loss` in the trainer).

Names follow DeepSeek-V3's published MTP layout: module m is `model.layers.{L+m}` where L is the
target's number of layers (`model.layers.{L+m}.{enorm,hnorm,eh_proj,shared_head.norm}` plus the
decoder layer's usual `self_attn.*`, `mlp.*`, `input_layernorm`, `post_attention_layernorm`), and
its attention is layer L+m of the engine's KV cache. DeepSeek's checkpoints also store copies of
the embedding (`embed_tokens`) and the head (`shared_head.head`); ours are the target's, so
`save_draft` leaves them out and `load_draft` ignores them. A draft directory is `config.json`
(the target's, plus `num_nextn_predict_layers`, DeepSeek's key) and `model.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slipstream.models.config import ModelConfig
from slipstream.models.decoder import Attention, DecoderLayer, RMSNorm, causal_attention, init_weights_
from slipstream.models.rope import rope_cos_sin

NUM_LAYERS_KEY = "num_nextn_predict_layers"  # DeepSeek-V3's config.json key for its MTP depth
_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # the target's; not ours to load


class _SharedHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """One MTP module: the fusion of (token embedding, hidden state), a decoder layer, a final norm."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = _SharedHead(config)

    def fuse(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))


class _Layers(nn.Module):
    def __init__(self, config: ModelConfig, num_layers: int) -> None:
        super().__init__()
        first = config.num_hidden_layers
        # A ModuleDict keyed by the absolute layer index gives the published names for free.
        self.layers = nn.ModuleDict({str(first + m): MTPLayer(config, first + m) for m in range(num_layers)})


class DraftHead(nn.Module):
    """`draft(hidden [B,T,H], next_ids [B,T], embed) -> normed hidden [B,T,H]` (feed it to the LM head)."""

    def __init__(self, config: ModelConfig, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a draft needs at least one MTP layer, got {num_layers}")
        self.config = config
        self.num_layers = num_layers
        self.model = _Layers(config, num_layers)

    @property
    def modules_in_order(self) -> list[MTPLayer]:
        return list(self.model.layers.values())

    def forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        embed: nn.Embedding,
        positions: torch.Tensor | None = None,
        attention: Attention | None = None,
    ) -> torch.Tensor:
        """hidden: the target's (or the previous draft step's) final hidden state at each position;
        next_ids: the token after each position; positions [B,T] (default 0..T-1); attention
        (default: causal over the batch, the training path; the engine passes its KV cache's)."""
        if positions is None:
            positions = torch.arange(next_ids.shape[1], device=next_ids.device).expand_as(next_ids)
        dtype = self.modules_in_order[0].eh_proj.weight.dtype  # the trainer's bf16 embedding, fp32 draft
        embeds = embed(next_ids).to(dtype)
        cos, sin = rope_cos_sin(positions, self.config.rope, dtype)
        attention = attention or causal_attention
        x = hidden.to(dtype)
        for layer in self.modules_in_order:
            x = layer(layer.fuse(embeds, x), cos, sin, attention)
            x = layer.shared_head.norm(x)
        return x


DRAFT_SEED = 0  # the version-0 draft, built alike by the trainer and every rollout server


def init_draft(config: ModelConfig, num_layers: int, seed: int = DRAFT_SEED) -> DraftHead:
    """A randomly initialised draft, the same on every process for the same seed (trainer and
    rollout servers start from the same version-0 draft without shipping it)."""
    draft = DraftHead(config, num_layers)
    init_weights_(draft, seed)
    return draft


def save_draft(draft: DraftHead, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`config.json` (the target's, plus num_nextn_predict_layers) and `model.safetensors`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    source = draft.state_dict() if state_dict is None else state_dict
    state = {name: t.detach().contiguous().cpu() for name, t in source.items()}
    config = draft.config.to_hf_dict()
    config[NUM_LAYERS_KEY] = draft.num_layers
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def load_draft(
    path: str | Path,
    target: ModelConfig,
    num_layers: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DraftHead:
    """The draft in `path`, checked against the target it drafts for and the expected depth."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in draft directory {path}")
    d = json.loads(config_path.read_text())
    found = d.get(NUM_LAYERS_KEY)
    if found != num_layers:
        raise ValueError(f"draft {path}: {NUM_LAYERS_KEY} is {found}, --mtp-num-layers is {num_layers}")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if d.get(key) != getattr(target, key):
            raise ValueError(
                f"draft {path}: {key} {d.get(key)} does not match the target's {getattr(target, key)}"
            )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in draft directory {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                if not name.endswith(_SHARED_COPIES):
                    state[name] = f.get_tensor(name).to(dtype)
    draft = DraftHead(target, num_layers).to(device=device, dtype=dtype)
    expected = dict(draft.state_dict())
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"draft {path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(
                f"draft {path}: {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}"
            )
    draft.load_state_dict(state)
    return draft.eval()


def is_draft_name(name: str, target: ModelConfig) -> bool:
    """Whether a weight name is a draft's (`model.layers.{L+m}.*`), not the target's."""
    if not name.startswith("model.layers."):
        return False
    return int(name.split(".", 3)[2]) >= target.num_hidden_layers


def draft_shapes(target: ModelConfig, num_layers: int) -> dict[str, tuple[int, ...]]:
    """The draft's tensor names and shapes (what a weights version carries for it), built on meta."""
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in DraftHead(target, num_layers).named_parameters()}
