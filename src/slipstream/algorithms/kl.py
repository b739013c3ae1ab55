"""KL estimators between the policy and a frozen reference, per token (Schulman's k1, k2, k3).

With r = log pi(x) - log pi_ref(x) for a token x sampled from the policy:

- k1 = r: unbiased for KL(pi || pi_ref), but negative on many tokens, so noisy;
- k2 = r^2 / 2: always >= 0, biased, low variance;
- k3 = exp(-r) - 1 + r: always >= 0 and unbiased (slime, GRPO); `low_var_kl` is k3 clamped to
  [-10, 10], which is what slime calls it, guarding against one token with a huge ratio.

These are slime's `compute_approx_kl` definitions and names (`--kl-loss-type`). They serve both
the KL loss (`--use-kl-loss`, gradient through `log_probs`) and the KL penalty in the reward of
REINFORCE++ (`--kl-coef`, on detached proximal log-probs).
"""

from __future__ import annotations

import torch

KL_TYPES = ("k1", "k2", "k3", "low_var_kl")


def approx_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str = "k1") -> torch.Tensor:
    """Per-token KL estimate, same shape as the inputs, float32; gradients flow through `log_probs`."""
    log_ratio = log_probs.float() - ref_log_probs.float().detach()
    if kl_type == "k1":
        return log_ratio
    if kl_type == "k2":
        return log_ratio.square() / 2.0
    if kl_type in ("k3", "low_var_kl"):
        kl = torch.expm1(-log_ratio) + log_ratio
        return kl.clamp(-10.0, 10.0) if kl_type == "low_var_kl" else kl
    raise ValueError(f"unknown KL type {kl_type!r} (expected one of {', '.join(KL_TYPES)})")
