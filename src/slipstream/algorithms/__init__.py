"""RL algorithms in pure torch: GRPO advantages, log-probs, entropy and the policy loss."""

from slipstream.algorithms.advantages import grpo_advantages
from slipstream.algorithms.losses import (
    chunked_token_log_probs,
    entropy_from_logits,
    masked_mean,
    policy_loss,
    token_log_probs,
)

__all__ = [
    "chunked_token_log_probs",
    "entropy_from_logits",
    "grpo_advantages",
    "masked_mean",
    "policy_loss",
    "token_log_probs",
]
