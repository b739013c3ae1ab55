"""Online draft training (--enable-mtp-training): the speculative draft learns the moving policy.

In RL the policy changes every step, so a draft frozen at step 0 proposes what the policy used to
say and its acceptance decays. Here the draft head (`slipstream.models.draft`) trains on the same
rollout tokens as the policy, in the same optimizer steps, and its weights travel inside every
weights version (`names()` are part of the pushed state dict), so a rollout server drafts with the
draft of the very version it serves.

The loss, per micro-batch, in the trainer's shifted frame (input position i holds token x_i and
the trunk's final hidden state H_i, which predicts x_{i+1}): the draft at position i reads
(H_i, x_{i+1}) and predicts x_{i+2}. Two terms, both weighted like the policy loss (the
`weights` of `--loss-agg-mode`, so micro-batching never changes the gradient) on the positions
whose x_{i+2} is a trained response token:
- cross-entropy of x_{i+2} under the draft's logits (the shared LM head) — slime's MTP loss;
- EAGLE's feature regression, smooth-L1 between the draft's output and H_{i+1}: the engine drafts
  autoregressively, feeding the draft's output back where the target's hidden state would be.
Their sum is scaled by --mtp-loss-scaling-factor. The trunk is detached for it (hidden states,
the embedding and the LM head weight all enter as constants): the draft loss never moves the
policy, only the draft.

Packed micro-batches (--use-dynamic-batch-size) give their hidden states back in the padded frame
(`padded_hidden`), so the draft sees the same tensors either way. Under FSDP2 (torchrun) the draft
is small and replicated on every rank, not sharded: each rank trains it on its own micro-batches
and `reduce_gradients` sums their gradients over ranks before its optimizer step, as FSDP does for
the policy (every rank then steps the same draft to the same weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.models.config import ModelConfig
from slipstream.models.draft import DraftHead, init_draft, load_draft

from .batch import Batch, Packed
from .parallel import average_gradients
from .step_metrics import StepMeans

_CHUNK = 4096  # response positions per LM-head chunk: never full-vocabulary logits for a whole batch


def padded_hidden(hidden: torch.Tensor, p: Packed, rows: int, cols: int) -> torch.Tensor:
    """A packed row's hidden states [N, H] -> the padded frame [rows, cols, H] (zeros past each end)."""
    lengths = p.cu_seqlens[1:] - p.cu_seqlens[:-1]
    seq = torch.repeat_interleave(p.order.to(hidden.device), lengths.to(hidden.device).long())
    index = seq * cols + p.positions[0]
    frame = hidden.new_zeros(rows * cols, hidden.shape[-1]).index_copy(0, index, hidden)
    return frame.view(rows, cols, -1)


class DraftTrainer:
    def __init__(
        self, target: ModelConfig, num_layers: int, path: str, scale: float, device: torch.device
    ) -> None:
        """The version-0 draft: `path`'s (--speculative-draft-model-path) or the seeded init the
        rollout servers build too; float32 (its AdamW state lives with the policy's)."""
        head = load_draft(path, target, num_layers) if path else init_draft(target, num_layers)
        self.head: DraftHead = head.to(device=device, dtype=torch.float32).train()
        self.scale = scale

    def parameters(self):
        return self.head.parameters()

    def reduce_gradients(self, world_size: int) -> None:
        """Sum the replicas' gradients over ranks (a collective: every rank calls it). Each rank's
        loss carries the world-size factor that FSDP's average over ranks takes out again."""
        average_gradients(list(self.head.parameters()), world_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The draft's tensors under their published names (`model.layers.{L+m}.*`)."""
        return {k: v.detach() for k, v in self.head.state_dict().items()}

    def loss(
        self, hidden: torch.Tensor, b: Batch, model: torch.nn.Module, weights: torch.Tensor, means: StepMeans
    ) -> torch.Tensor:
        """The scaled draft loss of one micro-batch; `hidden` [B, T, H] the trunk's final hidden states."""
        hidden = hidden.detach()
        w = weights[:, 1:]  # position i's draft predicts x_{i+2}: the target of position i+1
        if hidden.shape[1] < 2 or not bool((w > 0).any()):
            return hidden.new_zeros(())
        embed = model.model.embed_tokens

        def frozen_embed(ids: torch.Tensor) -> torch.Tensor:
            return embed(ids).detach()

        out = self.head(hidden[:, :-1], b.targets[:, :-1], frozen_embed)  # [B, T-1, H]
        rows = (w > 0).nonzero(as_tuple=True)
        out, w = out[rows], w[rows]
        labels = b.targets[:, 1:][rows]
        head_weight = model.lm_head.weight.detach()
        ce = torch.cat(
            [
                F.cross_entropy(F.linear(o, head_weight.to(o.dtype)).float(), y, reduction="none")
                for o, y in zip(out.split(_CHUNK), labels.split(_CHUNK), strict=True)
            ]
        )
        regression = F.smooth_l1_loss(out, hidden[:, 1:][rows].to(out.dtype), reduction="none").mean(-1)
        n = b.loss_mask[:, 1:].sum()
        means.add_sum("mtp_loss", (ce.detach() * (b.loss_mask[:, 1:][rows])).sum(), n)
        means.add_sum("mtp_regression_loss", (regression.detach() * (b.loss_mask[:, 1:][rows])).sum(), n)
        return self.scale * ((ce + regression.float()) * w).sum()
