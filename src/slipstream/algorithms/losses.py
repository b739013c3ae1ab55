"""Log-probs, entropy and the clipped policy-gradient loss, with slime's definitions and signs.

Three log-probs meet in the loss, one per token: `rollout_log_probs` from the engine that sampled
(the behaviour policy), `old_log_probs` recomputed by the trainer before the update (the proximal
policy; the rollout ones under `--use-rollout-logprobs`) and `log_probs` of the policy being
trained, the only one gradients flow through.

- PPO-clip with clip-higher (DAPO): with ratio r = exp(log_probs - old_log_probs) the per-token
  loss is max(-r A, -clip(r, 1 - eps_clip, 1 + eps_clip_high) A). A larger upper bound lets
  unlikely tokens with positive advantage gain probability faster, which keeps entropy from
  collapsing.
- TIS (truncated importance sampling): the engine's numerics (kernels, FP8, batch shape) differ
  from the trainer's, so even fresh samples are slightly off-policy. Each token's loss is
  weighted by w = clamp(exp(old_log_probs - rollout_log_probs), tis_clip_low, tis_clip), without
  gradient, as slime's `vanilla_tis_function` does.
- Aggregation is token-level over the loss mask (every trained token weighs the same, as in
  DAPO and slime's `--calculate-per-token-loss`): sum(x * mask) / max(sum(mask), 1).

Log-probs are computed in float32 whatever the model's dtype: bf16 log-softmax over a 150k
vocabulary loses the differences between the three log-probs that the ratio is made of.
Temperature divides the logits as the engine did when sampling (slime's `rollout_temperature`);
temperature 0 means greedy sampling and is treated as 1.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return logits


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[targets]: logits [B, T, V], targets [B, T] -> [B, T] fp32."""
    logits = _scaled(logits, temperature)
    picked = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _chunk_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    return token_log_probs(hidden @ weight.T, targets, temperature)


def chunked_token_log_probs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """`token_log_probs(hidden @ lm_head_weight.T, targets)` without all [B, T, V] logits at once.

    hidden [B, T, H], lm_head_weight [V, H], targets [B, T] -> [B, T] fp32. The tokens are cut
    into chunks of `chunk_tokens`; under autograd each chunk is checkpointed, so backward
    recomputes one chunk's logits at a time instead of keeping all of them alive.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    batch, seq = targets.shape
    flat_hidden = hidden.reshape(batch * seq, hidden.shape[-1])
    flat_targets = targets.reshape(batch * seq)
    track = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    pieces = []
    for start in range(0, batch * seq, chunk_tokens):
        h = flat_hidden[start : start + chunk_tokens]
        t = flat_targets[start : start + chunk_tokens]
        if track:
            pieces.append(
                checkpoint(_chunk_log_probs, h, lm_head_weight, t, temperature, use_reentrant=False)
            )
        else:
            pieces.append(_chunk_log_probs(h, lm_head_weight, t, temperature))
    if not pieces:
        return torch.zeros(batch, seq, device=hidden.device)
    return torch.cat(pieces).view(batch, seq)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per token: [B, T, V] -> [B, T] fp32."""
    log_p = torch.log_softmax(_scaled(logits, temperature), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean of x over mask: sum(x * mask) / max(sum(mask), 1)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1)


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float | None,
    rollout_log_probs: torch.Tensor | None = None,
    use_tis: bool = False,
    tis_clip: float = 2.0,
    tis_clip_low: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss (asymmetric clip, optional TIS), token-averaged over `loss_mask`.

    All inputs are [B, T] (advantages already broadcast per token). Returns the scalar loss and
    detached metrics: pg_clipfrac, ppo_kl, and with TIS tis_mean, tis_max, tis_clipfrac.
    `eps_clip_high=None` means symmetric clipping.
    """
    if eps_clip_high is None:
        eps_clip_high = eps_clip
    old_log_probs = old_log_probs.detach()
    advantages = advantages.detach()
    mask = loss_mask.to(torch.float32)

    # slime's sign convention: ppo_kl = old - new, ratio = exp(-ppo_kl).
    ppo_kl = old_log_probs - log_probs
    ratio = torch.exp(-ppo_kl)
    pg_losses1 = -ratio * advantages
    pg_losses2 = -ratio.clamp(1 - eps_clip, 1 + eps_clip_high) * advantages
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    clipped = (pg_losses2 > pg_losses1).float()

    metrics: dict[str, torch.Tensor] = {}
    if use_tis:
        if rollout_log_probs is None:
            raise ValueError("use_tis needs rollout_log_probs")
        tis = torch.exp(old_log_probs - rollout_log_probs.detach())
        tis_weights = tis.clamp(tis_clip_low, tis_clip)
        pg_losses = pg_losses * tis_weights
        metrics["tis_mean"] = masked_mean(tis, mask)
        # Weights are positive, so zeroing masked tokens leaves the max over trained ones (0 if none).
        masked_tis = torch.where(mask > 0, tis, torch.zeros_like(tis))
        metrics["tis_max"] = masked_tis.amax() if masked_tis.numel() else tis.new_zeros(())
        metrics["tis_clipfrac"] = masked_mean((tis_weights != tis).float(), mask)

    loss = masked_mean(pg_losses, mask)
    metrics["pg_clipfrac"] = masked_mean(clipped, mask)
    metrics["ppo_kl"] = masked_mean(ppo_kl.detach(), mask)
    return loss, {k: v.detach() for k, v in metrics.items()}
