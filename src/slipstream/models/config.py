"""The architecture as Hugging Face's `config.json` spells it, for each family we run.

Qwen3, Qwen2/Qwen2.5 and Llama 3.x are one decoder (RMSNorm, GQA attention with rotate-half RoPE,
SwiGLU MLP) that differs in a few switches, so a family is a small table row rather than a model
file: Qwen3 norms each head's q and k before RoPE; Qwen2 always has biases on q/k/v (and none on
o, with no config key for either); Llama has `attention_bias` (q/k/v/o) and `mlp_bias` keys, off
in every released Llama 3.x. Qwen3-MoE is Qwen3 with some MLPs replaced by a sparse
mixture of experts (`moe.py`; which layers: `decoder_sparse_step`, `mlp_only_layers`).
`config.json`'s `model_type` picks the row.

What we do not implement (sliding windows, other activations, RoPE kinds `rope.py` lacks, other
model types) is refused with one line naming it, rather than loaded and run with the wrong
arithmetic. Keys we do not use are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slipstream.models.rope import Rope, scaling_from_hf


@dataclass(frozen=True)
class Family:
    """What a `model_type` fixes about the decoder."""

    architecture: str  # config.json's `architectures` entry (transformers' class name)
    qk_norm: bool  # RMSNorm over each head's q and k, before RoPE
    qkv_bias: bool  # biases on q/k/v whatever the config says (Qwen2)
    switches: tuple[str, ...]  # the bias keys its config.json has: attention_bias (q/k/v/o), mlp_bias
    has_sliding_window: bool  # its config.json has `use_sliding_window` (we refuse it on)
    moe: bool = False  # its config.json has the mixture-of-experts keys (MOE_KEYS)


FAMILIES: dict[str, Family] = {
    "qwen3": Family("Qwen3ForCausalLM", qk_norm=True, qkv_bias=False, switches=("attention_bias",), has_sliding_window=True),
    "qwen2": Family("Qwen2ForCausalLM", qk_norm=False, qkv_bias=True, switches=(), has_sliding_window=True),
    "llama": Family("LlamaForCausalLM", qk_norm=False, qkv_bias=False, switches=("attention_bias", "mlp_bias"), has_sliding_window=False),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", qk_norm=True, qkv_bias=False, switches=("attention_bias",), has_sliding_window=True, moe=True),
}  # fmt: skip
MOE_KEYS = (
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "routed_scaling_factor",
)  # fmt: skip

DEFAULT_ROPE_THETA = 10_000.0  # transformers' default where config.json names none


@dataclass
class ModelConfig:
    """The architecture, spelled as Hugging Face's `config.json` spells it (defaults: Qwen3)."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None  # None: plain RoPE; else `rope_type` and its parameters
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o biases where the family has the switch (Qwen3, Llama)
    mlp_bias: bool = False  # gate/up/down biases (Llama's switch)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "qwen3"  # a key of FAMILIES
    # Mixture of experts (MoE families only; num_experts 0 = dense). Defaults: transformers'
    # Qwen3MoeConfig's, so a config.json that leaves a key out means what it means there.
    num_experts: int = 0  # routed experts per MoE layer (transformers 5 writes `num_local_experts`)
    num_experts_per_tok: int = 8  # top-k
    moe_intermediate_size: int = 768  # each expert's SwiGLU width
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to one
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    router_aux_loss_coef: float = 0.001  # load-balancing loss weight (moe.load_balancing_loss)
    # The gate weights times this (DeepSeek-V3's and GLM-4.5-MoE's key; moe.route). Qwen3-MoE has no
    # such key: config.json carries it only when it is not 1, and transformers' Qwen3-MoE ignores it.
    routed_scaling_factor: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported (supported: {', '.join(FAMILIES)})"
            )
        for switch in ("attention_bias", "mlp_bias"):
            if getattr(self, switch) and switch not in self.family.switches:
                raise ValueError(f"{switch}=true does not exist for model_type {self.model_type!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts and not self.family.moe:
            raise ValueError(
                f"num_experts={self.num_experts} does not exist for model_type {self.model_type!r}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        if self.num_experts > 1 << 15:
            raise ValueError(f"num_experts {self.num_experts} > 32768: routed ids are recorded as int16")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.routed_scaling_factor != 1.0 and not self.num_experts:
            raise ValueError("routed_scaling_factor scales routed experts' gates; this model has no experts")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        self.mlp_only_layers = list(self.mlp_only_layers)
        self.rope_scaling = scaling_from_hf(self.rope_scaling)

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.family.qkv_bias

    @property
    def rope(self) -> Rope:
        return Rope.of(self.head_dim, self.rope_theta, self.max_position_embeddings, self.rope_scaling)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The indexes of the layers whose MLP is a mixture of experts, ascending (transformers' rule)."""
        if not self.num_experts:
            return ()
        return tuple(
            i
            for i in range(self.num_hidden_layers)
            if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a `config.json` (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        d = dict(d)
        model_type = d.pop("model_type", "qwen3")
        if model_type not in FAMILIES:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
        family = FAMILIES[model_type]
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        d.pop("rope_scaling", None)
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (expected 'silu')")
        theta = d.pop("rope_theta", None) or rope.get("rope_theta") or DEFAULT_ROPE_THETA
        if family.moe and "num_local_experts" in d:  # transformers 5's spelling of num_experts
            d["num_experts"] = d.pop("num_local_experts")
        if family.moe:
            d.setdefault("num_experts", 128)  # transformers' default
        unread = {"extra", "rope_theta", "rope_scaling", "model_type", "attention_bias", "mlp_bias"}
        known = (set(cls.__dataclass_fields__) - unread - set(MOE_KEYS)) | set(family.switches)
        if family.moe:
            known |= set(MOE_KEYS)
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        written_by_us = ("hidden_act", "attention_dropout", "use_sliding_window", "sliding_window")
        for derived in ("architectures", "transformers_version", "layer_types", *written_by_us):
            d.pop(derived, None)
        return cls(rope_theta=float(theta), rope_scaling=rope, model_type=model_type, extra=d, **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` that `transformers` (4.x and 5.x) loads as this family's config."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            architectures=[self.family.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,  # a copy: readers mutate it
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_dropout=0.0,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        out.update({switch: getattr(self, switch) for switch in self.family.switches})
        if self.family.has_sliding_window:
            out["use_sliding_window"] = False
        if self.family.moe:  # the spelling published checkpoints use (num_experts, not num_local_experts)
            out.pop("num_local_experts", None)
            out.update({key: getattr(self, key) for key in MOE_KEYS})
            if self.routed_scaling_factor == 1.0:  # not a Qwen3-MoE key: written only when it matters
                del out["routed_scaling_factor"]
            out["mlp_only_layers"] = list(self.mlp_only_layers)
        return out
