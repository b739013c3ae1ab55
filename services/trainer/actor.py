"""The policy being trained: model, optimizer, and one rollout's worth of optimizer steps.

One rollout step (the trainer's "step") trains on `rollout_batch_size` groups. It first
recomputes the proximal ("old") log-probs of every response token under the current weights
(unless `--use-rollout-logprobs`), then runs `samples / global_batch_size` optimizer steps,
each accumulated over micro-batches. Losses are aggregated per token over the whole global
batch: each micro-batch's masked mean is reweighted by its share of the global batch's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slipstream.algorithms.losses import chunked_token_log_probs, policy_loss
from slipstream.config import Config
from slipstream.models.hf import load_model

from .batch import Batch, collate, split


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    logprob_abs_diff_mean: float
    pg_clipfrac: float
    num_tokens: int
    num_optimizer_steps: int
    tis_mean: float | None = None


class Actor:
    def __init__(self, cfg: Config, model_path: str | None = None):
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        self.model = load_model(model_path or cfg.model.hf_checkpoint, device=self.device, dtype=dtype)
        self.model.train()
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
            foreach=self.device.type != "cuda",
            fused=self.device.type == "cuda",
        )

    # ---- log-probs -------------------------------------------------------------------------
    def log_probs(self, batch: Batch) -> torch.Tensor:
        """Per-token log-probs of `batch.targets` under the current weights, [B, T]."""
        hidden = self.model.model(batch.input_ids)
        return chunked_token_log_probs(
            hidden, self.model.lm_head.weight, batch.targets, temperature=self.cfg.rollout.rollout_temperature
        )

    @torch.no_grad()
    def old_log_probs(self, batches: list[Batch]) -> list[torch.Tensor]:
        self.model.eval()
        out = [self.log_probs(b) for b in batches]
        self.model.train()
        return out

    # ---- one rollout step ------------------------------------------------------------------
    def train_rollout(self, samples: list, advantages: list[float]) -> StepStats:
        cfg = self.cfg
        micro = [
            collate(s, a).to(self.device)
            for s, a in zip(
                split(samples, cfg.train.micro_batch_size),
                split(advantages, cfg.train.micro_batch_size),
                strict=True,
            )
        ]
        rollout_lp = [b.rollout_log_probs for b in micro]
        old = rollout_lp if cfg.algo.use_rollout_logprobs else self.old_log_probs(micro)

        diff_sum = sum(
            ((o - r).abs() * b.loss_mask).sum().item() for o, r, b in zip(old, rollout_lp, micro, strict=True)
        )
        total_tokens = sum(b.num_tokens for b in micro)

        per_step = max(1, cfg.global_batch_size // cfg.train.micro_batch_size)
        losses, norms, clipfracs, tis = [], [], [], []
        steps = 0
        for start in range(0, len(micro), per_step):
            chunk = list(range(start, min(start + per_step, len(micro))))
            step_tokens = sum(micro[i].num_tokens for i in chunk)
            if step_tokens == 0:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for i in chunk:
                b = micro[i]
                if b.num_tokens == 0:
                    continue
                lp = self.log_probs(b)
                loss, metrics = policy_loss(
                    lp,
                    old[i],
                    b.advantages,
                    b.loss_mask,
                    eps_clip=cfg.algo.eps_clip,
                    eps_clip_high=cfg.eps_clip_high,
                    rollout_log_probs=b.rollout_log_probs if cfg.algo.use_tis else None,
                    use_tis=cfg.algo.use_tis,
                    tis_clip=cfg.algo.tis_clip,
                    tis_clip_low=cfg.algo.tis_clip_low,
                )
                weight = b.num_tokens / step_tokens
                (loss * weight).backward()
                step_loss += loss.item() * weight
                clipfracs.append(float(metrics["pg_clipfrac"]))
                if "tis_mean" in metrics:
                    tis.append(float(metrics["tis_mean"]))
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.clip_grad)
            self.optimizer.step()
            losses.append(step_loss)
            norms.append(float(norm))
            steps += 1
        return StepStats(
            loss=sum(losses) / max(len(losses), 1),
            grad_norm=sum(norms) / max(len(norms), 1) if norms else math.nan,
            logprob_abs_diff_mean=diff_sum / max(total_tokens, 1),
            pg_clipfrac=sum(clipfracs) / max(len(clipfracs), 1),
            num_tokens=total_tokens,
            num_optimizer_steps=steps,
            tis_mean=sum(tis) / len(tis) if tis else None,
        )

    def state_dict_for_sync(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}
