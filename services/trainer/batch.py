"""Groups from the buffer -> padded tensors for the policy loss.

A sample's `tokens` are prompt + response. The model reads `tokens[:-1]` and predicts
`tokens[1:]`, so response token j (0-based) is predicted at input position
`prompt_length - 1 + j`. Everything per token below ([B, T]) is laid out in that
shifted frame; positions outside the response have `loss_mask` 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slipstream.types import Sample, Status


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] float, 1 = trained response token
    rollout_log_probs: torch.Tensor  # [B, T], 0 outside the response
    advantages: torch.Tensor  # [B, T], the sample's advantage on each of its tokens
    versions: torch.Tensor  # [B, T] long, policy version per response token (-1 outside)
    num_tokens: int  # sum of loss_mask

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.targets,
                    self.loss_mask,
                    self.rollout_log_probs,
                    self.advantages,
                    self.versions,
                )
            ),
            num_tokens=self.num_tokens,
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def trainable(sample: Sample) -> bool:
    return sample.status is not Status.FAILED and sample.response_length > 0


def collate(samples: list[Sample], advantages: list[float], pad_id: int = 0) -> Batch:
    """Right-pad samples into one batch (pads come after real tokens, so causal attention is exact)."""
    width = max(len(s.tokens) - 1 for s in samples)
    b = len(samples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, width), dtype=torch.float32)
    rollout_lp = torch.zeros((b, width), dtype=torch.float32)
    adv = torch.zeros((b, width), dtype=torch.float32)
    versions = torch.full((b, width), -1, dtype=torch.long)
    for i, (s, a) in enumerate(zip(samples, advantages, strict=True)):
        toks = torch.tensor(s.tokens, dtype=torch.long)
        n = len(s.tokens) - 1
        input_ids[i, :n] = toks[:-1]
        targets[i, :n] = toks[1:]
        start, r = s.prompt_length - 1, s.response_length
        if not trainable(s):
            continue
        mask = s.loss_mask if s.loss_mask is not None else [1] * r
        loss_mask[i, start : start + r] = torch.tensor(mask, dtype=torch.float32)
        if s.rollout_log_probs is not None:
            rollout_lp[i, start : start + r] = torch.tensor(s.rollout_log_probs, dtype=torch.float32)
        if s.policy_versions is not None:
            versions[i, start : start + r] = torch.tensor(s.policy_versions, dtype=torch.long)
        adv[i, start : start + r] = a
    return Batch(input_ids, targets, loss_mask, rollout_lp, adv, versions, int(loss_mask.sum().item()))


def split(samples: list, size: int) -> list[list]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]
