"""Rotary position embeddings: plain RoPE and the scaled kinds checkpoints ship with.

A checkpoint's `config.json` names its RoPE in `rope_scaling` (transformers 4.x) or
`rope_parameters` (5.x): `default`, or a scaling that stretches the trained context. Every kind
here changes only two things: the inverse frequencies (one per pair of head dims) and a factor on
cos/sin. So `Rope` is those parameters, `frequencies` computes the two once per device, and the
decoder (and the engine's fused decode, which reads the same cos/sin) never knows which kind ran.

- `linear`: every frequency divided by `factor` (positions interpolated).
- `llama3`: Llama 3.1's split by wavelength: high frequencies kept, low ones divided by `factor`,
  a smooth blend between `high_freq_factor` and `low_freq_factor` of the original context.
- `yarn`: a ramp between interpolated and original frequencies over the dims that rotate between
  `beta_slow` and `beta_fast` times in the original context, and an attention factor
  (0.1 ln(factor) + 1, or the `mscale` ratio) on cos/sin.

The arithmetic follows `transformers.modeling_rope_utils` op for op, in fp32 on the CPU, so the
angles agree bit for bit (`tests/test_model_families.py`). Other kinds (`dynamic`, `longrope`, ...)
are refused by name rather than run wrong.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED = ("default", "linear", "llama3", "yarn")
_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ()}


def scaling_from_hf(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """config.json's `rope_scaling`/`rope_parameters` -> its scaling keys with `rope_type` (None: plain).

    `rope_theta` is left out (the config holds it); a kind we cannot compute is refused here."""
    if not d:
        return None
    kind = d.get("rope_type") or d.get("type") or "default"  # `type`: older exports' spelling
    d = {k: v for k, v in d.items() if k not in ("rope_theta", "type")} | {"rope_type": kind}
    if kind not in SUPPORTED:
        raise ValueError(f"rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    if kind == "default":
        return None
    missing = [k for k in _REQUIRED[kind] if d.get(k) is None]
    if missing:
        raise ValueError(f"rope type {kind!r} needs {', '.join(missing)} in rope_scaling")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {d['partial_rotary_factor']} is not supported")
    return d


@dataclass(frozen=True)
class Rope:
    """What the angles depend on; hashable, so its frequencies are computed once per device."""

    head_dim: int
    theta: float
    max_position_embeddings: int
    scaling: tuple[tuple[str, Any], ...] = ()  # sorted items of the scaling dict; () is plain RoPE

    @classmethod
    def of(cls, head_dim: int, theta: float, max_positions: int, scaling: dict[str, Any] | None) -> Rope:
        items = tuple(sorted((scaling or {}).items()))
        return cls(head_dim, float(theta), max_positions, items)


@functools.cache
def frequencies(rope: Rope, device: torch.device) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32 on `device`, factor on cos/sin).

    Computed on the CPU like transformers does; cached per device because a host-to-device copy
    per forward is a sync the decode loop cannot afford."""
    p = dict(rope.scaling)
    kind = p.get("rope_type", "default")
    dim, base = rope.head_dim, rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / p["factor"]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, p, rope.max_position_embeddings)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(p, rope)
    return inv_freq.to(device), float(attention_factor)


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any], max_positions: int) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context = p.get("original_max_position_embeddings") or max_positions
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(p: dict[str, Any], rope: Rope) -> tuple[torch.Tensor, float]:
    dim, base = rope.head_dim, rope.theta
    original = p.get("original_max_position_embeddings") or rope.max_position_embeddings
    factor = p.get("factor") or rope.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times in `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_share = 1 - ramp
    interpolated, extrapolated = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    return interpolated * (1 - extrapolation_share) + extrapolated * extrapolation_share, attention_factor


def rope_cos_sin(
    positions: torch.Tensor, rope: Rope, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B,T,head_dim] for integer positions [B,T] (angles in fp32, halves duplicated)."""
    inv_freq, attention_factor = frequencies(rope, positions.device)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:  # yarn; plain RoPE skips two launches the decode step would pay
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,H,T,D]; cos/sin [B,T,D] (rotate-half convention, as Hugging Face checkpoints expect)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]
