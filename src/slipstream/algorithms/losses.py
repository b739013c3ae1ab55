"""Log-probs, entropy and the clipped policy-gradient loss, with slime's definitions and signs.

Three log-probs meet in the loss, one per token: `rollout_log_probs` from the engine that sampled
(the behaviour policy), `old_log_probs` recomputed by the trainer before the update (the proximal
policy; the rollout ones under `--use-rollout-logprobs`) and `log_probs` of the policy being
trained, the only one gradients flow through.

- PPO-clip with clip-higher (DAPO): with ratio r = exp(log_probs - old_log_probs) the per-token
  loss is max(-r A, -clip(r, 1 - eps_clip, 1 + eps_clip_high) A). A larger upper bound lets
  unlikely tokens with positive advantage gain probability faster, which keeps entropy from
  collapsing.
- GSPO (`--advantage-estimator gspo`, `sequence_ratio=True`): one ratio per sequence,
  exp(mean over its tokens of log_probs - old_log_probs), clipped per sequence (slime's
  `compute_gspo_kl`); the gradient flows through the mean into every token.
- Decoupled PPO / TIS / MIS: the loss of each token is multiplied by the behaviour correction of
  `importance.py` (truncated weight proximal/behaviour, MIS rejection), without gradient, as
  slime's `vanilla_tis_function` does. With recomputed proximal log-probs, `--use-tis` is
  AReaL's decoupled PPO.
- Aggregation: a weighted token sum with weights from `aggregation.py` (`--loss-agg-mode`);
  without weights, token-level over the loss mask: sum(x * mask) / max(sum(mask), 1).

Log-probs are computed in float32 whatever the model's dtype: bf16 log-softmax over a 150k
vocabulary loses the differences between the three log-probs that the ratio is made of.
Temperature divides the logits as the engine did when sampling (slime's `rollout_temperature`);
temperature 0 means greedy sampling and is treated as 1.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from slipstream.algorithms.importance import behaviour_correction


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


def _chunk_log_probs_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    log_p = torch.log_softmax(_scaled(hidden @ weight.T, temperature), dim=-1)
    picked = log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked, -(log_p.exp() * log_p).sum(dim=-1)


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
    return _chunked(_chunk_log_probs, hidden, lm_head_weight, targets, temperature, chunk_tokens)


def chunked_log_probs_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunked_token_log_probs` plus the entropy of each position's distribution, both [B, T] fp32."""
    return _chunked(_chunk_log_probs_entropy, hidden, lm_head_weight, targets, temperature, chunk_tokens)


@functools.cache
def compiled(fn):
    """`fn` under torch.compile (one fused kernel per chunk for the cast, softmax and gather)."""
    return torch.compile(fn, dynamic=True)


def compiled_token_log_probs(hidden, lm_head_weight, targets, temperature=1.0, chunk_tokens=4096):
    """`chunked_token_log_probs` with each chunk's arithmetic compiled (CUDA)."""
    return _chunked(compiled(_chunk_log_probs), hidden, lm_head_weight, targets, temperature, chunk_tokens)


def compiled_log_probs_and_entropy(hidden, lm_head_weight, targets, temperature=1.0, chunk_tokens=4096):
    """`chunked_log_probs_and_entropy` with each chunk's arithmetic compiled (CUDA)."""
    fn = compiled(_chunk_log_probs_entropy)
    return _chunked(fn, hidden, lm_head_weight, targets, temperature, chunk_tokens)


def _chunked(fn, hidden, lm_head_weight, targets, temperature, chunk_tokens):
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
            pieces.append(checkpoint(fn, h, lm_head_weight, t, temperature, use_reentrant=False))
        else:
            pieces.append(fn(h, lm_head_weight, t, temperature))
    if not pieces:
        out = torch.zeros(batch, seq, device=hidden.device)
        return out if fn in (_chunk_log_probs, compiled(_chunk_log_probs)) else (out, out.clone())
    if isinstance(pieces[0], tuple):
        return tuple(torch.cat(p).view(batch, seq) for p in zip(*pieces, strict=True))
    return torch.cat(pieces).view(batch, seq)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per token: [B, T, V] -> [B, T] fp32."""
    log_p = torch.log_softmax(_scaled(logits, temperature), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean of x over mask: sum(x * mask) / max(sum(mask), 1)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1)


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of each row, broadcast back over the row: [B, T] -> [B, T]."""
    mask = mask.to(x.dtype)
    return ((x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)).expand_as(x)


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
    tis_level: str = "token",
    use_mis: bool = False,
    mis_low: float = 0.5,
    mis_high: float = 2.0,
    mis_level: str = "token",
    sequence_ratio: bool = False,
    loss_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss (asymmetric clip; GSPO's sequence ratio; TIS/MIS behaviour corrections).

    All inputs are [B, T] (advantages already per token). The loss is sum(per-token loss *
    loss_weights); without `loss_weights`, the token mean over `loss_mask`. Returns the scalar
    loss and detached metrics, token means over `loss_mask`: pg_clipfrac, ppo_kl, and with TIS
    tis_mean, tis_max, tis_clipfrac, with MIS mis_masked_frac. `eps_clip_high=None` means
    symmetric clipping.
    """
    if eps_clip_high is None:
        eps_clip_high = eps_clip
    old_log_probs = old_log_probs.detach()
    advantages = advantages.detach()
    mask = loss_mask.to(torch.float32)

    # slime's sign convention: ppo_kl = old - new, ratio = exp(-ppo_kl).
    ppo_kl = old_log_probs - log_probs
    if sequence_ratio:
        ppo_kl = sequence_mean(ppo_kl, mask)
    ratio = torch.exp(-ppo_kl)
    pg_losses1 = -ratio * advantages
    pg_losses2 = -ratio.clamp(1 - eps_clip, 1 + eps_clip_high) * advantages
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    clipped = (pg_losses2 > pg_losses1).float()

    metrics: dict[str, torch.Tensor] = {}
    if use_tis or use_mis:
        if rollout_log_probs is None:
            raise ValueError("use_tis/use_mis need rollout_log_probs")
        corr = behaviour_correction(
            old_log_probs, rollout_log_probs.detach(), mask,
            use_tis=use_tis, tis_clip=tis_clip, tis_clip_low=tis_clip_low, tis_level=tis_level,
            use_mis=use_mis, mis_low=mis_low, mis_high=mis_high, mis_level=mis_level,
        )  # fmt: skip
        pg_losses = pg_losses * corr.weights * corr.keep
        metrics.update(corr.metrics)

    weights = loss_weights if loss_weights is not None else mask / mask.sum().clamp_min(1)
    loss = (pg_losses * weights).sum()
    metrics["pg_clipfrac"] = masked_mean(clipped, mask)
    metrics["ppo_kl"] = masked_mean(ppo_kl.detach(), mask)
    return loss, {k: v.detach() for k, v in metrics.items()}
