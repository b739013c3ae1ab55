"""RL algorithms in pure torch: advantages, log-probs, entropy, KL, behaviour corrections, the policy loss."""

from slipstream.algorithms.advantages import (
    group_scores,
    grpo_advantages,
    masked_whiten,
    reinforce_plus_plus_baseline_advantages,
    reinforce_plus_plus_returns,
)
from slipstream.algorithms.aggregation import loss_token_weights, step_totals
from slipstream.algorithms.importance import behaviour_correction
from slipstream.algorithms.kl import approx_kl
from slipstream.algorithms.losses import (
    chunked_log_probs_and_entropy,
    chunked_token_log_probs,
    entropy_from_logits,
    masked_mean,
    policy_loss,
    token_log_probs,
)
from slipstream.algorithms.staleness import apply_staleness_policy

__all__ = [
    "apply_staleness_policy",
    "approx_kl",
    "behaviour_correction",
    "chunked_log_probs_and_entropy",
    "chunked_token_log_probs",
    "entropy_from_logits",
    "group_scores",
    "grpo_advantages",
    "loss_token_weights",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "reinforce_plus_plus_baseline_advantages",
    "reinforce_plus_plus_returns",
    "step_totals",
    "token_log_probs",
]
