"""The Actor's step: one rollout's worth of optimizer steps.

One rollout step (the trainer's "step") trains on `rollout_batch_size` groups:

1. recompute the proximal ("old") log-probs of every response token under the current weights
   (unless `--use-rollout-logprobs`), and the reference model's when a KL term needs them;
2. turn the per-sample scores into per-token advantages (`--advantage-estimator`; REINFORCE++
   puts the KL penalty in the reward here) and whiten them over the step if asked;
3. run `samples / global_batch_size` optimizer steps, each accumulated over micro-batches.
   Each micro-batch's loss is a weighted token sum whose weights (`--loss-agg-mode`) are
   normalized over its whole optimizer step, so micro-batching never changes the gradient.
   Micro-batches are `--micro-batch-size` samples, or under `--use-dynamic-batch-size`
   first-fit bins of at most `--max-tokens-per-gpu` tokens; either kind is packed into one row
   (`batch.py`), so the forward computes no pads; a bin never mixes two optimizer steps' samples.
   An optimizer step whose loss or gradient norm is not finite is skipped (weights and moments
   untouched) and counted; the loop stops the run after `--max-nonfinite-steps` in a row.

The loss per optimizer step (`objective.py`) is pg_loss (PPO-clip or GSPO, times the TIS weight,
zeroed by MIS) - entropy_coef * entropy + kl_loss_coef * KL(policy || reference), as slime adds
them; its metrics are token-weighted means kept on the device until the step ends
(`step_metrics.py`).

Under torchrun every rank holds the whole step's samples (rank 0 shares them), computes the
proximal/reference log-probs, advantages and loss weights of all of them (so whitening and token
totals need no extra collective), and trains on its own micro-batches: micro-batch j of an
optimizer step belongs to rank j % world. FSDP averages gradients over ranks, so each rank's loss
is scaled by the world size to keep the per-token sum normalised over the whole global batch.
Metrics are rank 0's view.

Each function takes the Actor (`actor.py`: the weights, optimizer and forwards it steps), whose
`train_rollout`, `train_sft` and `micro_batches` methods are these.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from slipstream.algorithms.aggregation import loss_token_weights, step_totals
from slipstream.types import Sample

from . import lora
from .batch import Batch, plan_micro_batches
from .objective import micro_batch_loss, sft_micro_batch_loss, token_advantages
from .parallel import average_gradients
from .routing import PROBE_SAMPLES
from .step_metrics import StepMeans, StepStats

if TYPE_CHECKING:
    from .actor import Actor

# A micro-batch's share of its optimizer step's loss: (index in the step's micro-batches, batch,
# loss token weights) -> scalar.
MicroLoss = Callable[[int, Batch, torch.Tensor], torch.Tensor]


def train_rollout(
    actor: Actor, samples: list[Sample], scores: list[float], trained_version: int = 0
) -> StepStats:
    """Train on `samples` (their loss masks already narrowed by the staleness policy).

    `scores` are the per-sample scalars of `advantages.group_scores` (the GRPO advantage,
    or the reward / centered reward for REINFORCE++); `trained_version` is the version of
    the weights being trained, for the staleness metric.
    """
    members, steps_of_micro = micro_batches(actor, samples)
    micro = [actor.tensors([samples[j] for j in m], [scores[j] for j in m]) for m in members]
    actor.moe.start_step()
    score_rows = [
        torch.tensor([scores[j] for j in m], dtype=torch.float32, device=actor.device) for m in members
    ]
    old = _proximal(actor, micro, steps_of_micro)
    ref = actor.ref_log_probs(micro)
    for b, adv in zip(micro, token_advantages(actor.algo, micro, score_rows, old, ref), strict=True):
        b.advantages = adv

    means = StepMeans()
    for b, o in zip(micro, old, strict=True):
        means.staleness(b.loss_mask, b.versions, trained_version)
        if not actor.algo.use_rollout_logprobs and o is not None:
            means.logprob_diff(o, b.rollout_log_probs, b.loss_mask > 0)
    if actor.moe.rollout_replay and members:  # R3's effect, on a few samples (routing.py)
        probe = [samples[j] for j in members[0][:PROBE_SAMPLES]]
        actor.moe.replay_gap(actor.log_probs, actor.tensors(probe, [0.0] * len(probe)), means)

    def loss(i: int, b: Batch, weights: torch.Tensor) -> torch.Tensor:
        routing = actor.moe.routing(b, training=True)
        keep = {} if actor.draft is not None else None
        lp, entropy = actor.log_probs_and_entropy(b, routing, keep)
        if old[i] is None:  # a first-step micro-batch: its proximal log-probs are these
            old[i] = lp.detach()
            means.logprob_diff(old[i], b.rollout_log_probs, b.loss_mask > 0)
        ref_i = None if ref is None else ref[i]
        policy = micro_batch_loss(actor.algo, b, lp, entropy, old[i], ref_i, weights, means)
        if actor.draft is not None:  # the trunk detached for it: it moves the draft only
            policy = policy + actor.draft.loss(keep["hidden"], b, actor.compute, weights, means)
        return policy + actor.moe.training_terms(b, routing, weights, means)

    return _optimizer_steps(actor, micro, steps_of_micro, loss, means)


def train_sft(actor: Actor, samples: list[Sample]) -> StepStats:
    """--loss-type sft_loss: the negative log-likelihood of every sample's trained tokens
    (its loss mask: response or assistant tokens), in the same optimizer steps and micro-batches."""
    members, steps_of_micro = micro_batches(actor, samples)
    micro = [actor.tensors([samples[j] for j in m], [0.0] * len(m)) for m in members]
    means = StepMeans()
    actor.moe.start_step()

    def loss(i: int, b: Batch, weights: torch.Tensor) -> torch.Tensor:
        routing = actor.moe.routing(b, training=True)
        keep = {} if actor.draft is not None else None
        lp = actor.log_probs(b, routing=routing, keep=keep)
        total = sft_micro_batch_loss(lp, weights) + actor.moe.training_terms(b, routing, weights, means)
        if actor.draft is not None:  # SFT trains the draft alongside, as RL does
            total = total + actor.draft.loss(keep["hidden"], b, actor.compute, weights, means)
        return total

    return _optimizer_steps(actor, micro, steps_of_micro, loss, means)


def micro_batches(actor: Actor, samples: list[Sample]) -> tuple[list[list[int]], list[list[int]]]:
    """(sample indices of each micro-batch, micro-batch indices of each optimizer step)."""
    t = actor.train
    return plan_micro_batches(
        samples,
        global_batch_size=actor.global_batch_size,
        micro_batch_size=t.effective_micro_batch_size(
            actor.global_batch_size, actor.device.type, actor.par.world_size
        ),
        max_tokens_per_gpu=t.max_tokens_per_gpu if t.use_dynamic_batch_size else None,
        world=actor.par.world_size,
    )


def _proximal(actor: Actor, micro: list[Batch], steps_of_micro: list[list[int]]) -> list[torch.Tensor | None]:
    """The proximal ("old") log-probs of each micro-batch; None: its training forward gives them.

    Proximal log-probs are the weights' as they are now. Until the first optimizer step they
    are exactly what the training forward computes, so the first step's micro-batches take
    theirs from it (`_optimizer_step`) instead of a forward of their own: a quarter of the
    step's GEMMs when one optimizer step trains the whole rollout. Only where nothing needs
    them earlier (REINFORCE++ puts a KL of them in the reward) and in one process (under
    FSDP2 rank 0's metrics cover every rank's micro-batches).
    """
    if actor.algo.use_rollout_logprobs:
        return [b.rollout_log_probs for b in micro]
    first: set[int] = set()
    if actor.par.world_size == 1 and not actor.algo.advantage_estimator.startswith("reinforce_plus_plus"):
        first = set(steps_of_micro[0]) if steps_of_micro else set()
    ahead = [i for i in range(len(micro)) if i not in first]
    old: list[torch.Tensor | None] = [None] * len(micro)
    for i, o in zip(ahead, actor.old_log_probs([micro[i] for i in ahead]), strict=True):
        old[i] = o
    return old


def _optimizer_steps(
    actor: Actor, micro: list[Batch], steps_of_micro: list[list[int]], loss: MicroLoss, means: StepMeans
) -> StepStats:
    losses, norms, skipped, lr = [], [], 0, actor.scheduler.lr
    for chunk in steps_of_micro:
        totals = step_totals([micro[i].loss_mask for i in chunk])
        if totals[0] == 0:
            continue
        lr = actor.scheduler.lr
        done = _optimizer_step(actor, [(i, micro[i]) for i in chunk], totals, loss)
        if done is None:
            skipped += 1
        else:
            losses.append(done[0])
            norms.append(done[1])
    stats = means.stats(losses, norms, sum(b.num_tokens for b in micro), skipped)
    stats.metrics["lr"] = lr  # the step's last optimizer step's (slime's train/lr-pg_0)
    return stats


def _optimizer_step(
    actor: Actor, chunk: list[tuple[int, Batch]], totals: tuple[int, int], loss: MicroLoss
) -> tuple[float, float] | None:
    """One AdamW step over the micro-batches `chunk`: (loss, gradient norm), or None if skipped."""
    world, rank = actor.par.world_size, actor.par.rank
    step_tokens, step_seqs = totals
    actor.optimizer.zero_grad(set_to_none=True)
    if actor.draft_optimizer is not None:
        actor.draft_optimizer.zero_grad(set_to_none=True)
    step_loss = 0.0
    for j, (i, b) in enumerate(chunk):
        if j % world != rank or (b.num_tokens == 0 and world == 1):
            # Another rank's micro-batch. (An empty one is still run under FSDP: every
            # rank must join the same number of forward/backward collectives.)
            continue
        weights = loss_token_weights(
            b.loss_mask, actor.algo.loss_agg_mode, step_tokens=step_tokens, step_seqs=step_seqs,
            max_len=actor.max_response_len,
        )  # fmt: skip
        micro_loss = loss(i, b, weights)
        (micro_loss * world).backward()  # FSDP averages gradients over ranks
        step_loss = step_loss + micro_loss.detach().double()  # on the device: no sync per micro-batch
    if actor.lora:  # replicated adapters: averaged here as FSDP averages the sharded weights
        average_gradients(lora.adapter_parameters(actor.model), world)
    return _step_if_finite(actor, step_loss)


def _step_if_finite(actor: Actor, step_loss) -> tuple[float, float] | None:
    norm = torch.nn.utils.clip_grad_norm_(actor.model.parameters(), actor.train.clip_grad)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    # The step's one host sync: whether it is finite decides what happens next.
    norm_f, loss_f = torch.stack(
        [norm.detach().double(), torch.as_tensor(step_loss, dtype=torch.float64, device=norm.device)]
    ).tolist()
    if actor.par.enabled:  # each rank summed its own micro-batches' share of the loss
        loss_f = actor.par.all_sum(loss_f)
    # The norm is over the whole (sharded) model and the loss is summed over ranks, so
    # every rank takes the same decision.
    if not (math.isfinite(norm_f) and math.isfinite(loss_f)):
        actor.optimizer.zero_grad(set_to_none=True)
        return None
    if actor.draft_optimizer is not None:
        actor.draft.reduce_gradients(actor.par.world_size)  # replicated under FSDP2 (`draft.py`)
        torch.nn.utils.clip_grad_norm_(actor.draft.parameters(), actor.train.clip_grad)
        for group in actor.draft_optimizer.param_groups:
            group["lr"] = actor.optimizer.param_groups[0]["lr"]
        actor.draft_optimizer.step()
    actor.optimizer.step()
    actor.scheduler.step()
    if actor.masters is not None:
        actor.masters.refresh()
    return loss_f, norm_f
