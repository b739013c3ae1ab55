"""How per-token losses become one number: `--loss-agg-mode` (verl's names), as token weights.

Every mode is a weighted sum, loss = sum over tokens of x * w, with w computed once for the
whole optimizer step, so cutting the step into micro-batches changes nothing:

- `token-mean`: w = mask / (trained tokens of the step). Every token weighs the same (DAPO;
  slime's `--calculate-per-token-loss`). Long answers weigh more per sample.
- `seq-mean-token-mean`: w = mask / (tokens of its sequence * sequences of the step). Every
  sequence weighs the same (slime's default, its `sum_of_sample_mean` over the global batch):
  a token of a short answer weighs more than one of a long answer.
- `seq-mean-token-sum-norm`: w = mask / (max_len * sequences of the step), max_len a constant
  (`--rollout-max-response-len`): Dr. GRPO's length-unbiased loss. A sequence's weight grows
  with its length exactly as its number of tokens does, so no length is favoured (miles'
  DrGRPO reducer, with the constant tied to the generation budget).

Sequences with no trained token (dropped as stale, fully masked) are not counted as sequences.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def step_totals(masks: list[torch.Tensor]) -> tuple[float, int]:
    """(trained tokens, sequences with at least one trained token) over the micro-batches of a step."""
    tokens = sum(float(m.sum()) for m in masks)
    seqs = sum(int((m.sum(-1) > 0).sum()) for m in masks)
    return tokens, seqs


def loss_token_weights(
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    step_tokens: float | None = None,
    step_seqs: int | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Weights [B, T] for one micro-batch whose step has `step_tokens` tokens in `step_seqs` sequences.

    Totals default to this batch's own (a single-batch step). The weights of the whole step sum
    to 1 for the two mean modes.
    """
    mask = mask.float()
    if step_tokens is None or step_seqs is None:
        step_tokens, step_seqs = step_totals([mask])
    if mode == "token-mean":
        return mask / max(step_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = mask.sum(-1, keepdim=True).clamp_min(1)
        return mask / per_seq / max(step_seqs, 1)
    if mode == "seq-mean-token-sum-norm":
        if not max_len or max_len <= 0:
            raise ValueError("seq-mean-token-sum-norm needs a positive max_len")
        return mask / (max_len * max(step_seqs, 1))
    raise ValueError(f"unknown loss aggregation {mode!r} (expected one of {', '.join(AGG_MODES)})")
