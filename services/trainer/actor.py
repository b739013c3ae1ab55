"""The policy being trained: model, optimizer, and one rollout's worth of optimizer steps.

One rollout step (the trainer's "step") trains on `rollout_batch_size` groups:

1. recompute the proximal ("old") log-probs of every response token under the current weights
   (unless `--use-rollout-logprobs`), and the reference model's when a KL term needs them;
2. turn the per-sample scores into per-token advantages (`--advantage-estimator`; REINFORCE++
   puts the KL penalty in the reward here) and whiten them over the step if asked;
3. run `samples / global_batch_size` optimizer steps, each accumulated over micro-batches.
   Each micro-batch's loss is a weighted token sum whose weights (`--loss-agg-mode`) are
   normalized over its whole optimizer step, so micro-batching never changes the gradient.
   Micro-batches are `--micro-batch-size` samples right-padded, or under
   `--use-dynamic-batch-size` first-fit bins of at most `--max-tokens-per-gpu` tokens packed
   into one row each (`batch.py`); a bin never mixes two optimizer steps' samples.
   An optimizer step whose loss or gradient norm is not finite is skipped (weights and moments
   untouched) and counted; the loop stops the run after `--max-nonfinite-steps` in a row.

The loss per optimizer step is pg_loss (PPO-clip or GSPO, times the TIS weight, zeroed by MIS)
- entropy_coef * entropy + kl_loss_coef * KL(policy || reference), as slime adds them.
The reference model is loaded once (`--ref-load`, default `--hf-checkpoint`), frozen, and only
ever run under no_grad.

Precision and memory: `--bf16` keeps float32 parameters, gradients and AdamW moments (the
master weights: a 1e-6 step is below bf16's resolution for most weights, so bf16 parameters
would silently not move) and runs forward and backward on a bf16 copy of the weights made once
per optimizer step (`precision.py`; FSDP2's `MixedPrecisionPolicy` under torchrun), so the
whole forward, residual stream included, is bf16 and no weight is cast at its use. AdamW is
fused on CUDA. `--torch-compile` compiles each decoder layer as two graphs around the attention
call (`compiled_layers.py`). `--gradient-checkpointing` recomputes each decoder layer in
backward. The LM head never materialises full-vocabulary fp32 logits for a whole batch:
`chunked_*` in `losses.py` works through the tokens a chunk at a time, checkpointed.

Under torchrun the policy is sharded with FSDP2 (`parallel.py`). Every rank holds the whole
step's samples (rank 0 shares them), computes the proximal/reference log-probs, advantages and
loss weights of all of them (so whitening and token totals need no extra collective), and
trains on its own micro-batches: micro-batch j of an optimizer step belongs to rank j % world.
FSDP averages gradients over ranks, so each rank's loss is scaled by the world size to keep
the per-token sum normalised over the whole global batch. Metrics are rank 0's view.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from slipstream.algorithms.advantages import (
    masked_whiten,
    reinforce_plus_plus_baseline_advantages,
    reinforce_plus_plus_returns,
)
from slipstream.algorithms.aggregation import loss_token_weights, step_totals
from slipstream.algorithms.kl import approx_kl
from slipstream.algorithms.losses import (
    chunked_log_probs_and_entropy,
    chunked_token_log_probs,
    compiled_log_probs_and_entropy,
    compiled_token_log_probs,
    policy_loss,
)
from slipstream.config import Config
from slipstream.models.hf import load_model
from slipstream.models.packed import packed_causal_attention
from slipstream.weights import weights_to_sync

from .batch import Batch, collate, first_fit, pack, split
from .compiled_layers import split_layers
from .parallel import Parallel, full_model_state, init_parallel, shard_model
from .precision import MasterWeights


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
    # Optimizer steps skipped because the loss or the gradient norm was not finite: the
    # weights (and AdamW's moments) were left as they were.
    num_skipped_steps: int = 0
    # Everything else worth a column in metrics.jsonl: token means over trained tokens (ppo_kl,
    # entropy, kl_loss, tis_*, mis_masked_frac), maxima (logprob_abs_diff_max, tis_max) and
    # the largest staleness among trained tokens (staleness_max_trained).
    metrics: dict[str, float] = field(default_factory=dict)


class _Means:
    """Token-weighted means (and maxima) of per-micro-batch metrics over a rollout step.

    Values may be device tensors: they stay there (no host sync per micro-batch) until
    `result()` reads them all at once. A maximum over nothing (-inf) is left out.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = defaultdict(float)
        self.weights: dict[str, Any] = defaultdict(float)
        self.maxima: dict[str, Any] = {}

    def add(self, name: str, value, weight) -> None:
        self.add_sum(name, value * weight, weight)

    def add_sum(self, name: str, total, count) -> None:
        """A mean's numerator and denominator, as computed (count may be a device tensor)."""
        self.sums[name] = self.sums[name] + total
        self.weights[name] = self.weights[name] + count

    def max(self, name: str, value) -> None:
        if name in self.maxima:
            old = self.maxima[name]
            value = (
                torch.maximum(old, value)
                if torch.is_tensor(value) or torch.is_tensor(old)
                else max(old, value)
            )
        self.maxima[name] = value

    def result(self) -> dict[str, float]:
        names = [*self.sums, *self.weights, *self.maxima]
        values = [*self.sums.values(), *self.weights.values(), *self.maxima.values()]
        tensors = [v for v in values if torch.is_tensor(v)]
        if tensors:  # one host sync for every metric of the step
            read = iter(torch.stack([t.detach().double().cpu().reshape(()) for t in tensors]).tolist())
            values = [next(read) if torch.is_tensor(v) else float(v) for v in values]
        n = len(self.sums)
        sums, weights, maxima = values[:n], values[n : 2 * n], values[2 * n :]
        out = {k: s / w for k, s, w in zip(names[:n], sums, weights, strict=True) if w > 0}
        out.update({k: m for k, m in zip(names[2 * n :], maxima, strict=True) if m != -math.inf})
        return out


def _checkpoint_layers(model: torch.nn.Module) -> None:
    """Activation checkpointing per decoder layer (only while gradients are recorded)."""
    for layer in model.model.layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False)
            return _forward(*args)

        layer.forward = checkpointed


def _split_for_ranks(bins: list[list[int]], lengths: list[int], world: int) -> list[list[int]]:
    """Split the fullest multi-sample bins until every rank gets as many micro-batches."""
    bins = [list(b) for b in bins]
    while len(bins) % world:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            raise ValueError(
                f"{len(bins)} packed micro-batches cannot be shared evenly by {world} trainer ranks "
                "(too few samples per optimizer step)"
            )
        big = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        i = bins.index(big)
        bins[i : i + 1] = [big[: len(big) // 2], big[len(big) // 2 :]]
    return bins


def _needs_ref(cfg: Config) -> bool:
    a = cfg.algo
    kl_in_reward = a.kl_coef > 0 and a.advantage_estimator.startswith("reinforce_plus_plus")
    return (a.use_kl_loss and a.kl_loss_coef > 0) or kl_in_reward


class Actor:
    """`model` holds the weights that checkpoints, the weight push and AdamW see (the fp32
    masters under `--bf16`); `compute` is the module forward and backward run on (a bf16 copy
    under `--bf16` in one process, else `model` itself).

    `baseline=True` is the trainer as it ran before bf16 compute weights and split-layer
    compilation: `--bf16` runs fp32 parameters under bf16 autocast and `--torch-compile`
    compiles only the norms and MLPs. Kept so the benchmark and the precision test can set old
    and new side by side.
    """

    def __init__(self, cfg: Config, model_path: str | None = None, baseline: bool = False):
        self.cfg = cfg
        self.par: Parallel = init_parallel(pick_device(cfg.infra.device))
        self.device = self.par.device
        t = cfg.train
        dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        if t.bf16:
            dtype = torch.float32  # the master weights
        self.autocast = t.bf16 and baseline
        split = t.bf16 and not baseline
        model = load_model(model_path or cfg.model.hf_checkpoint, device=self.device, dtype=dtype)
        self.masters = MasterWeights(model) if split and not self.par.enabled else None
        compute = self.masters.compute if self.masters else model
        self.split_compiled = t.torch_compile and not baseline
        if self.split_compiled:
            split_layers(compute)  # two compiled graphs per layer around the attention call
        elif t.torch_compile:
            for layer in compute.model.layers:
                for piece in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
                    piece.compile(dynamic=True)
        if t.gradient_checkpointing:
            _checkpoint_layers(compute)
        self.model = shard_model(model, self.par, param_dtype=torch.bfloat16 if split else None)
        self.compute = compute if self.masters else self.model
        self.compute.train()
        self.ref_model = None
        if _needs_ref(cfg):
            # The reference stays the initial policy even when resuming from a checkpoint. It
            # only runs forward, so under --bf16 (without autocast) it is simply bf16.
            self.ref_model = load_model(
                cfg.model.ref_load or cfg.model.hf_checkpoint,
                device=self.device,
                dtype=torch.bfloat16 if split else dtype,
            )
            self.ref_model.eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
            foreach=self.device.type != "cuda",
            fused=self.device.type == "cuda",
        )

    # ---- log-probs -------------------------------------------------------------------------
    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _forward(self, model: torch.nn.Module, batch: Batch, head_fn):
        """`head_fn(hidden, lm_head_weight, targets, temperature=)` of `batch`, in the padded [B, T] frame."""
        t = self.cfg.rollout.rollout_temperature
        p = batch.packed
        if self.masters is not None and model is self.compute:
            self.masters.refresh_if_changed()  # e.g. a checkpoint was loaded into the masters
        with self._autocast():
            if p is None:
                return model(batch.input_ids, head=lambda h, w: head_fn(h, w, batch.targets, temperature=t))
            rows, cols = batch.input_ids.shape

            def head(h, w):
                # Response positions only, then back into the padded frame (zeros elsewhere).
                out = head_fn(h[0, p.head_rows][None], w, p.head_targets[None], temperature=t)
                outs = out if isinstance(out, tuple) else (out,)
                frame = [
                    x.new_zeros(rows * cols).index_copy(0, p.head_index, x[0]).view(rows, cols) for x in outs
                ]
                return tuple(frame) if isinstance(out, tuple) else frame[0]

            attention = packed_causal_attention(p.cu_seqlens, p.max_len)
            return model(p.input_ids, positions=p.positions, attention=attention, head=head)

    def log_probs(self, batch: Batch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Per-token log-probs of `batch.targets` under the current (or given) weights, [B, T]."""
        fn = compiled_token_log_probs if self.cfg.train.torch_compile else chunked_token_log_probs
        return self._forward(model or self.compute, batch, fn)

    def log_probs_and_entropy(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        fn = compiled_log_probs_and_entropy if self.cfg.train.torch_compile else chunked_log_probs_and_entropy
        return self._forward(self.compute, batch, fn)

    def old_log_probs(self, batches: list[Batch]) -> list[torch.Tensor]:
        if self.split_compiled:
            # Inductor fuses a no-grad graph differently from the training graph, so bf16
            # roundings land elsewhere and the proximal log-probs would differ from the ones
            # the loss recomputes at the same weights (on the H200 benchmark's model by up to
            # ~1 nat: a first-step loss of 0.7 instead of 0). Run the training graph itself and
            # drop what it saved: the ratio is then exactly 1 where the weights have not moved.
            with torch.enable_grad():
                return [self.log_probs(b).detach() for b in batches]
        with torch.no_grad():
            self.compute.eval()
            out = [self.log_probs(b) for b in batches]
            self.compute.train()
        return out

    @torch.no_grad()
    def ref_log_probs(self, batches: list[Batch]) -> list[torch.Tensor] | None:
        if self.ref_model is None:
            return None
        return [self.log_probs(b, self.ref_model) for b in batches]

    # ---- advantages ------------------------------------------------------------------------
    def _token_advantages(
        self,
        micro: list[Batch],
        scores: list[torch.Tensor],
        old: list[torch.Tensor | None],
        ref: list[torch.Tensor] | None,
    ) -> list[torch.Tensor]:
        """Per-token advantages of each micro-batch (collate broadcast the GRPO scalar already)."""
        a = self.cfg.algo
        est = a.advantage_estimator
        if est.startswith("reinforce_plus_plus"):
            kls = [
                approx_kl(o, r, a.kl_loss_type) if ref is not None and a.kl_coef > 0 else torch.zeros_like(o)
                for o, r in zip(old, ref or old, strict=True)
            ]
            if est == "reinforce_plus_plus":
                advs = [
                    reinforce_plus_plus_returns(s, kl, b.loss_mask, a.kl_coef, a.gamma)
                    for s, kl, b in zip(scores, kls, micro, strict=True)
                ]
            else:
                advs = [
                    reinforce_plus_plus_baseline_advantages(s, kl, a.kl_coef)
                    for s, kl in zip(scores, kls, strict=True)
                ]
        else:
            advs = [b.advantages for b in micro]
        if a.normalize_advantages:
            advs = masked_whiten(advs, [b.loss_mask for b in micro])
        return advs

    # ---- one rollout step ------------------------------------------------------------------
    def train_rollout(self, samples: list, scores: list[float], trained_version: int = 0) -> StepStats:
        """Train on `samples` (their loss masks already narrowed by the staleness policy).

        `scores` are the per-sample scalars of `advantages.group_scores` (the GRPO advantage,
        or the reward / centered reward for REINFORCE++); `trained_version` is the version of
        the weights being trained, for the staleness metric.
        """
        cfg, a = self.cfg, self.cfg.algo
        members, steps_of_micro = self.micro_batches(samples)
        make = pack if cfg.train.use_dynamic_batch_size else collate
        micro = [make([samples[j] for j in m], [scores[j] for j in m]).to(self.device) for m in members]
        score_rows = [
            torch.tensor([scores[j] for j in m], dtype=torch.float32, device=self.device) for m in members
        ]
        rollout_lp = [b.rollout_log_probs for b in micro]
        # Proximal log-probs are the weights' as they are now. Until the first optimizer step
        # they are exactly what the training forward computes, so the first step's micro-batches
        # take theirs from it (lp.detach(), below) instead of a forward of their own: a quarter
        # of the step's GEMMs when one optimizer step trains the whole rollout. Only where
        # nothing needs them earlier (REINFORCE++ puts a KL of them in the reward) and in one
        # process (under FSDP2 rank 0's metrics cover every rank's micro-batches).
        first = set()
        if self.par.world_size == 1 and not a.advantage_estimator.startswith("reinforce_plus_plus"):
            first = set(steps_of_micro[0]) if steps_of_micro else set()
        if a.use_rollout_logprobs:
            old: list[torch.Tensor | None] = list(rollout_lp)
        else:
            ahead = [i for i in range(len(micro)) if i not in first]
            old = [None] * len(micro)
            for i, o in zip(ahead, self.old_log_probs([micro[i] for i in ahead]), strict=True):
                old[i] = o
        ref = self.ref_log_probs(micro)
        for b, adv in zip(micro, self._token_advantages(micro, score_rows, old, ref), strict=True):
            b.advantages = adv

        means = _Means()
        total_tokens = sum(b.num_tokens for b in micro)
        for b, o in zip(micro, old, strict=True):
            trained = b.loss_mask > 0
            known = trained & (b.versions >= 0)
            stale = torch.where(known, trained_version - b.versions, torch.iinfo(torch.long).min).max()
            means.max("staleness_max_trained", torch.where(known.any(), stale.double(), -math.inf))
            if not a.use_rollout_logprobs and o is not None:
                self._logprob_diff(means, o, b.rollout_log_probs, trained)

        world, rank = self.par.world_size, self.par.rank
        losses, norms = [], []
        steps = skipped = 0
        for chunk in steps_of_micro:
            step_tokens, step_seqs = step_totals([micro[i].loss_mask for i in chunk])
            if step_tokens == 0:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for j, i in enumerate(chunk):
                b = micro[i]
                if j % world != rank or (b.num_tokens == 0 and world == 1):
                    # Another rank's micro-batch. (An empty one is still run under FSDP: every
                    # rank must join the same number of forward/backward collectives.)
                    continue
                weights = loss_token_weights(
                    b.loss_mask, a.loss_agg_mode, step_tokens=step_tokens, step_seqs=step_seqs,
                    max_len=cfg.rollout.rollout_max_response_len,
                )  # fmt: skip
                lp, entropy = self.log_probs_and_entropy(b)
                if old[i] is None:  # a first-step micro-batch: its proximal log-probs are these
                    old[i] = lp.detach()
                    self._logprob_diff(means, old[i], b.rollout_log_probs, b.loss_mask > 0)
                loss, metrics = policy_loss(
                    lp, old[i], b.advantages, b.loss_mask,
                    eps_clip=a.eps_clip, eps_clip_high=cfg.algo.effective_eps_clip_high,
                    rollout_log_probs=b.rollout_log_probs,
                    use_tis=a.use_tis, tis_clip=a.tis_clip, tis_clip_low=a.tis_clip_low, tis_level=a.tis_level,
                    use_mis=a.use_mis, mis_low=a.mis_low, mis_high=a.mis_high, mis_level=a.mis_level,
                    sequence_ratio=a.advantage_estimator == "gspo",
                    loss_weights=weights,
                )  # fmt: skip
                if a.entropy_coef:
                    loss = loss - a.entropy_coef * (entropy * weights).sum()
                if ref is not None and a.use_kl_loss and a.kl_loss_coef > 0:
                    kl = approx_kl(lp, ref[i], a.kl_loss_type)
                    loss = loss + a.kl_loss_coef * (kl * weights).sum()
                    if b.num_tokens:
                        means.add_sum("kl_loss", (kl.detach() * b.loss_mask).sum(), b.num_tokens)
                (loss * world).backward()  # FSDP averages gradients over ranks
                step_loss = step_loss + loss.detach().double()  # on the device: no sync per micro-batch
                n = b.num_tokens
                if n == 0:
                    continue
                means.add_sum("entropy", (entropy.detach() * b.loss_mask).sum(), n)
                if a.use_rollout_logprobs:
                    self._logprob_diff(means, lp.detach(), b.rollout_log_probs, b.loss_mask > 0)
                for k, v in metrics.items():
                    if k == "tis_max":
                        means.max(k, v)
                    else:
                        means.add(k, v, n)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.clip_grad)
            if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
                norm = norm.full_tensor()
            # The step's one host sync: whether it is finite decides what happens next.
            norm_f, loss_f = torch.stack(
                [norm.detach().double(), torch.as_tensor(step_loss, dtype=torch.float64, device=norm.device)]
            ).tolist()
            if self.par.enabled:  # each rank summed its own micro-batches' share of the loss
                loss_f = self.par.all_sum(loss_f)
            # The norm is over the whole (sharded) model and the loss is summed over ranks, so
            # every rank takes the same decision.
            if not (math.isfinite(norm_f) and math.isfinite(loss_f)):
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            self.optimizer.step()
            if self.masters is not None:
                self.masters.refresh()
            losses.append(loss_f)
            norms.append(norm_f)
            steps += 1
        out = means.result()
        return StepStats(
            loss=sum(losses) / max(len(losses), 1),
            grad_norm=sum(norms) / max(len(norms), 1) if norms else math.nan,
            logprob_abs_diff_mean=out.pop("logprob_abs_diff_mean", 0.0),
            pg_clipfrac=out.pop("pg_clipfrac", 0.0),
            num_tokens=total_tokens,
            num_optimizer_steps=steps,
            tis_mean=out.pop("tis_mean", None),
            num_skipped_steps=skipped,
            metrics=out,
        )

    @staticmethod
    def _logprob_diff(means: _Means, lp: torch.Tensor, rollout: torch.Tensor, trained: torch.Tensor) -> None:
        diff = (lp - rollout).abs() * trained
        means.add_sum("logprob_abs_diff_mean", diff.sum(), trained.sum())
        means.max("logprob_abs_diff_max", torch.where(trained.any(), diff.max(), -math.inf))

    def micro_batches(self, samples: list) -> tuple[list[list[int]], list[list[int]]]:
        """(sample indices of each micro-batch, micro-batch indices of each optimizer step).

        Optimizer step k trains samples [k * global_batch_size, (k + 1) * global_batch_size).
        Padded: micro-batches of --micro-batch-size in order. Packed: first fit of the step's
        samples into --max-tokens-per-gpu tokens, split further until the trainer ranks share
        the micro-batches evenly (micro-batch j of a step runs on rank j % world).
        """
        t, world = self.cfg.train, self.par.world_size
        gbs = self.cfg.effective_global_batch_size
        members: list[list[int]] = []
        steps: list[list[int]] = []
        for start in range(0, len(samples), gbs):
            idx = list(range(start, min(start + gbs, len(samples))))
            if t.use_dynamic_batch_size:
                lengths = [len(samples[i].tokens) - 1 for i in idx]
                bins = _split_for_ranks(first_fit(lengths, t.max_tokens_per_gpu), lengths, world)
                groups = [[idx[j] for j in b] for b in bins]
            else:
                groups = split(idx, t.micro_batch_size)
                if len(groups) % world:
                    raise ValueError(
                        f"global batch ({gbs}) / micro batch ({t.micro_batch_size}) = {len(groups)} "
                        f"micro-batches per optimizer step must be a multiple of the trainer world size ({world})"
                    )
            steps.append(list(range(len(members), len(members) + len(groups))))
            members.extend(groups)
        return members, steps

    def state_dict_for_sync(self) -> dict[str, torch.Tensor]:
        """The full weights to push (a collective under FSDP2; only rank 0's result is used)."""
        full = full_model_state(self.model) if self.par.enabled else self.model.state_dict()
        tied = self.model.config.tie_word_embeddings
        return {k: v.detach() for k, v in weights_to_sync(full, tied).items()}
