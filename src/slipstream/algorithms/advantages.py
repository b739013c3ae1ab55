"""Advantages: how much better each sample (or token) did than what was expected of it.

The estimators are slime's (`--advantage-estimator`), with its formulas, so runs compare:

- **grpo** (and **gspo**, which differs only in the loss): no value model. The n samples of one
  prompt form a group; a sample's advantage is its reward minus the group mean, divided by the
  group's standard deviation (`--disable-grpo-std-normalization` turns that off, as Dr. GRPO
  argues: it up-weights prompts that are nearly always solved or always failed). slime's unbiased
  (n - 1) std and eps added to it are kept. A group whose rewards all agree carries no signal:
  zeros, not NaN. The scalar is broadcast over the sample's tokens.
- **reinforce_plus_plus**: token-level rewards -kl_coef * KL_t (KL of the proximal policy to the
  reference, `--kl-coef`), plus the sample's reward on its last trained token; the advantage of
  a token is its discounted return sum_{k >= t} gamma^(k - t) r_k. No baseline: whitening over
  the whole batch (`--normalize-advantages`, required) supplies it.
- **reinforce_plus_plus_baseline**: the group mean is the baseline (reward - group mean, no std),
  broadcast over tokens, minus kl_coef * KL_t; then whitened over the batch.

Whitening (`masked_whiten`) is global over every trained token of the rollout step: one mean,
one unbiased variance, as slime's `distributed_masked_whiten`.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


def grpo_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [num_groups, n] -> advantages [num_groups, n], in float32."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, n], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    # With one sample per prompt the std is undefined (slime turns normalization off then too);
    # the centered advantage is already zero.
    if normalize_std and rewards.shape[-1] > 1:
        centered = centered / (rewards.std(dim=-1, keepdim=True) + eps)
    return centered


def group_scores(rewards: torch.Tensor, estimator: str, normalize_std: bool = True) -> torch.Tensor:
    """Per-sample scalars [num_groups, n] each estimator starts from (slime's `_post_process_rewards`).

    grpo/gspo: the GRPO advantage; reinforce_plus_plus_baseline: reward - group mean;
    reinforce_plus_plus: the raw reward.
    """
    if estimator in ("grpo", "gspo"):
        return grpo_advantages(rewards, normalize_std=normalize_std)
    if estimator == "reinforce_plus_plus_baseline":
        rewards = rewards.float()
        return rewards - rewards.mean(dim=-1, keepdim=True)
    if estimator == "reinforce_plus_plus":
        return rewards.float()
    raise ValueError(f"unknown advantage estimator {estimator!r} (expected one of {', '.join(ESTIMATORS)})")


def discounted_returns(token_rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} along the last dim: [B, T] -> [B, T]."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[..., 0])
    for t in range(token_rewards.shape[-1] - 1, -1, -1):
        running = token_rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns


def reinforce_plus_plus_returns(
    rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, gamma: float
) -> torch.Tensor:
    """rewards [B], per-token kl and mask [B, T] -> returns [B, T] (slime's REINFORCE++ returns).

    A row without a trained token gets no reward (it is out of the loss anyway).
    """
    mask = mask.float()
    token_rewards = -kl_coef * kl.float() * mask
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).amax(-1)  # [B]
    has = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    token_rewards[rows, last[has]] += rewards.float()[has]
    return discounted_returns(token_rewards, gamma)


def reinforce_plus_plus_baseline_advantages(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """scores [B] (reward - group mean), kl [B, T] -> unwhitened advantages [B, T]."""
    return scores.float()[:, None] - kl_coef * kl.float()


def masked_whiten(
    values: list[torch.Tensor], masks: list[torch.Tensor], eps: float = 1e-8
) -> list[torch.Tensor]:
    """Whiten every tensor with one mean and unbiased variance over all masked entries of all of them."""
    n = sum(float(m.sum()) for m in masks)
    if n == 0:
        return [v.clone() for v in values]
    total = sum(float((v * m).sum()) for v, m in zip(values, masks, strict=True))
    total_sq = sum(float((v.square() * m).sum()) for v, m in zip(values, masks, strict=True))
    mean = total / n
    var = total_sq / n - mean**2
    if n >= 2:
        var *= n / (n - 1)  # Bessel, as slime
    scale = 1.0 / (max(var, 0.0) + eps) ** 0.5
    return [(v - mean) * scale for v in values]
