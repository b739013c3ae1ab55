"""What the trainer minimises, per micro-batch: token advantages in, one loss term out.

`token_advantages` turns the per-sample scores of `advantages.group_scores` into per-token
advantages (`--advantage-estimator`; REINFORCE++ puts the KL penalty in the reward here) and
whitens them over the rollout step if asked (`--normalize-advantages`).

`sft_micro_batch_loss` is --loss-type sft_loss: the weighted negative log-likelihood.

`micro_batch_loss` is slime's sum: pg_loss (PPO-clip or GSPO, times the TIS weight, zeroed by
MIS) - entropy_coef * entropy + kl_loss_coef * KL(policy || reference), each a weighted token
sum whose weights (`--loss-agg-mode`, `aggregation.loss_token_weights`) are normalised over the
whole optimizer step, so micro-batching never changes the gradient. Pure torch: no model here.
"""

from __future__ import annotations

import torch

from slipstream.algorithms.advantages import (
    masked_whiten,
    reinforce_plus_plus_baseline_advantages,
    reinforce_plus_plus_returns,
)
from slipstream.algorithms.kl import approx_kl
from slipstream.algorithms.losses import policy_loss
from slipstream.config import AlgoConfig

from .batch import Batch
from .step_metrics import StepMeans


def needs_reference(a: AlgoConfig) -> bool:
    """Whether a KL term (in the loss or in the reward) needs the frozen reference model."""
    kl_in_reward = a.kl_coef > 0 and a.advantage_estimator.startswith("reinforce_plus_plus")
    return (a.use_kl_loss and a.kl_loss_coef > 0) or kl_in_reward


def token_advantages(
    a: AlgoConfig,
    micro: list[Batch],
    scores: list[torch.Tensor],
    old: list[torch.Tensor | None],
    ref: list[torch.Tensor] | None,
) -> list[torch.Tensor]:
    """Per-token advantages of each micro-batch (collate broadcast the GRPO scalar already)."""
    est = a.advantage_estimator
    if est.startswith("reinforce_plus_plus"):
        kls = [
            approx_kl(o, r, a.kl_loss_type) if ref is not None and a.kl_coef > 0 else torch.zeros_like(o)
            for o, r in zip(old, ref or old, strict=True)
        ]
        if est == "reinforce_plus_plus":
            advs = [
                reinforce_plus_plus_returns(s, kl, b.loss_mask, a.kl_coef, a.gamma)
                for s, kl, b in zip(scores, kls, micro, strict=True)
            ]
        else:
            advs = [
                reinforce_plus_plus_baseline_advantages(s, kl, a.kl_coef)
                for s, kl in zip(scores, kls, strict=True)
            ]
    else:
        advs = [b.advantages for b in micro]
    if a.normalize_advantages:
        advs = masked_whiten(advs, [b.loss_mask for b in micro])
    return advs


def micro_batch_loss(
    a: AlgoConfig,
    b: Batch,
    lp: torch.Tensor,
    entropy: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor | None,
    weights: torch.Tensor,
    means: StepMeans,
) -> torch.Tensor:
    """The micro-batch's share of its optimizer step's loss; its metrics go into `means`."""
    loss, metrics = policy_loss(
        lp, old, b.advantages, b.loss_mask,
        eps_clip=a.eps_clip, eps_clip_high=a.effective_eps_clip_high,
        rollout_log_probs=b.rollout_log_probs,
        use_tis=a.effective_use_tis, tis_clip=a.tis_clip, tis_clip_low=a.tis_clip_low, tis_level=a.tis_level,
        use_mis=a.use_mis, mis_low=a.mis_low, mis_high=a.mis_high, mis_level=a.mis_level,
        sequence_ratio=a.advantage_estimator == "gspo",
        loss_weights=weights,
    )  # fmt: skip
    if a.entropy_coef:
        loss = loss - a.entropy_coef * (entropy * weights).sum()
    n = b.num_tokens
    if ref is not None and a.use_kl_loss and a.kl_loss_coef > 0:
        kl = approx_kl(lp, ref, a.kl_loss_type)
        loss = loss + a.kl_loss_coef * (kl * weights).sum()
        if n:
            means.add_sum("kl_loss", (kl.detach() * b.loss_mask).sum(), n)
    if n:
        means.add_sum("entropy", (entropy.detach() * b.loss_mask).sum(), n)
        if a.use_rollout_logprobs:
            means.logprob_diff(lp.detach(), b.rollout_log_probs, b.loss_mask > 0)
        for k, v in metrics.items():
            if k == "tis_max":
                means.max(k, v)
            else:
                means.add(k, v, n)
    return loss


def sft_micro_batch_loss(lp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """--loss-type sft_loss (slime's): the negative log-likelihood of the trained tokens, weighted
    like the policy loss (`--loss-agg-mode`; token-mean by default), so micro-batching never
    changes the gradient here either (the loss mask is already in `weights`)."""
    return -(lp * weights).sum()
