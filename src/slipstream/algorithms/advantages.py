"""Advantages: how much better each sample did than its siblings.

GRPO needs no value model: the n samples of one prompt form a group, and a sample's advantage
is its reward minus the group mean, divided by the group's standard deviation (slime's
`--grpo-std-normalization`, on by default; Dr. GRPO argues for turning it off because it
up-weights prompts that are nearly always solved or always failed). The formula follows slime
exactly, including its unbiased (n - 1) standard deviation and eps added to it, so a run
reproduces slime's numbers. A group whose rewards are all equal carries no signal: its
advantages are zero, not NaN. The per-sample advantage is broadcast over the response tokens by
the caller.
"""

from __future__ import annotations

import torch


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
