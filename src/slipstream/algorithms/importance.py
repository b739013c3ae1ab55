"""Behaviour-policy corrections: TIS weights and MIS masks from proximal/behaviour log-probs.

A token was sampled by the behaviour policy (the engine, at the version it had then: stale by
up to `--max-staleness` versions, and numerically not quite the trainer's model even when
fresh). PPO's ratio is taken against the proximal policy (the trainer's weights before this
step), so the gradient estimate still needs the behaviour importance ratio

    rho = pi_prox(x) / pi_behav(x) = exp(old_log_probs - rollout_log_probs)

This is AReaL's *decoupled PPO*: clip the current/proximal ratio (the trust region is around
weights the trainer actually has), weight by the proximal/behaviour ratio (the off-policy
correction). In Slipstream (and slime) that weight *is* `--use-tis` when the proximal log-probs
are recomputed: `--use-tis` = decoupled PPO with a truncated behaviour weight. Under
`--use-rollout-logprobs` proximal and behaviour coincide, rho = 1, and both corrections are
meaningless (the config refuses the combination, as slime does).

- TIS (`--use-tis`): weight = clamp(rho, tis_clip_low, tis_clip), no gradient (slime's
  `vanilla_tis_function`). Levels: `token` (rho per token), `sequence` (the product of the
  sequence's token ratios, exp(sum log rho), one weight for all its tokens: unbiased, high
  variance), `geometric` (exp(mean log rho): the per-token geometric mean).
- MIS (`--use-mis`): tokens, or whole sequences, whose ratio at `--mis-level` leaves
  [mis_low, mis_high] are rejected: their loss is zeroed. As in slime's mis.py, the denominators
  of the loss are not changed by the rejection, so rejecting tokens never inflates the others.
  AReaL's "mask tokens whose behaviour weight exceeds a cap" is `--use-mis --mis-low 0
  --mis-high cap` (with `--use-tis --tis-clip cap` for its weighting).

Log-ratios are clamped to [-20, 20] before exp: beyond e^20 every band and truncation is decided
anyway, and the metrics stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LEVELS = ("token", "sequence", "geometric")
_LOG_CLAMP = 20.0


def level_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Per-token log-ratio [B, T] at `level`: itself, its masked row sum, or its masked row mean."""
    if level == "token":
        return log_ratio
    mask = mask.to(log_ratio.dtype)
    total = (log_ratio * mask).sum(-1, keepdim=True)
    if level == "geometric":
        total = total / mask.sum(-1, keepdim=True).clamp_min(1)
    elif level != "sequence":
        raise ValueError(f"unknown level {level!r} (expected one of {', '.join(LEVELS)})")
    return total.expand_as(log_ratio)


@dataclass
class BehaviourCorrection:
    """What the behaviour ratio does to the loss of each token; all without gradient."""

    weights: torch.Tensor  # [B, T] TIS weight (1 where TIS is off)
    keep: torch.Tensor  # [B, T] float, 0 = rejected by MIS (1 where MIS is off)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # token means over the loss mask


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (
        torch.where(mask > 0, x, torch.full_like(x, -torch.inf)).amax().clamp_min(0)
        if x.numel()
        else x.new_zeros(())
    )


@torch.no_grad()
def behaviour_correction(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    use_tis: bool = False,
    tis_clip: float = 2.0,
    tis_clip_low: float = 0.0,
    tis_level: str = "token",
    use_mis: bool = False,
    mis_low: float = 0.5,
    mis_high: float = 2.0,
    mis_level: str = "token",
) -> BehaviourCorrection:
    """TIS weights and MIS keep-mask for [B, T] log-probs; metrics are over `loss_mask` tokens.

    Metrics: `tis_mean`/`tis_max` (the raw ratio at --tis-level, before truncation),
    `tis_clipfrac` (share of tokens whose weight was truncated) with TIS; `mis_masked_frac`
    (share of tokens rejected) with MIS.
    """
    mask = loss_mask.float()
    log_ratio = old_log_probs.float() - rollout_log_probs.float()
    weights = torch.ones_like(log_ratio)
    keep = torch.ones_like(log_ratio)
    metrics: dict[str, torch.Tensor] = {}
    if use_tis:
        rho = level_log_ratio(log_ratio, mask, tis_level).clamp(-_LOG_CLAMP, _LOG_CLAMP).exp()
        weights = rho.clamp(tis_clip_low, tis_clip)
        metrics["tis_mean"] = _masked_mean(rho, mask)
        metrics["tis_max"] = _masked_max(rho, mask)
        metrics["tis_clipfrac"] = _masked_mean((weights != rho).float(), mask)
    if use_mis:
        rho = level_log_ratio(log_ratio, mask, mis_level).clamp(-_LOG_CLAMP, _LOG_CLAMP).exp()
        keep = ((rho >= mis_low) & (rho <= mis_high)).float()
        metrics["mis_masked_frac"] = _masked_mean(1.0 - keep, mask)
    return BehaviourCorrection(weights=weights, keep=keep, metrics=metrics)
