"""The policy being trained: model, optimizer, and one rollout's worth of optimizer steps.

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
(`step_metrics.py`). The reference model is loaded once (`--ref-load`, default `--hf-checkpoint`), frozen, and only
ever run under no_grad.

Precision and memory: `--bf16` keeps float32 parameters, gradients and AdamW moments (the
master weights: a 1e-6 step is below bf16's resolution for most weights, so bf16 parameters
would silently not move) and runs forward and backward on a bf16 copy of the weights made once
per optimizer step (`precision.py`; FSDP2's `MixedPrecisionPolicy` under torchrun), so the
whole forward, residual stream included, is bf16 and no weight is cast at its use. AdamW is
fused on CUDA. `--torch-compile` compiles each decoder layer as two graphs around the attention
call (`compiled_layers.py`). `--int4-qat` and `--fp8-format e4m3` (unified FP8) run forward and
backward on the quantized weights the rollout serves, straight-through to the masters
(`quantized.py`). `--gradient-checkpointing` recomputes each decoder layer in
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

import math
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from slipstream.algorithms.aggregation import loss_token_weights, step_totals
from slipstream.algorithms.losses import (
    chunked_log_probs_and_entropy,
    chunked_token_log_probs,
    compiled_log_probs_and_entropy,
    compiled_token_log_probs,
)
from slipstream.config import AlgoConfig, Config, ModelConfig, TrainConfig, check_true_on_policy_dtypes
from slipstream.kernels import invariant
from slipstream.kernels.invariant import make_invariant
from slipstream.kernels.moe import use_grouped_experts
from slipstream.models.hf import load_model
from slipstream.models.packed import packed_causal_attention
from slipstream.types import Sample, Status
from slipstream.weights import weights_to_sync

from . import lora
from .batch import Batch, collate, pack, plan_micro_batches
from .compiled_layers import split_layers
from .draft import DraftTrainer, padded_hidden
from .objective import micro_batch_loss, needs_reference, sft_micro_batch_loss, token_advantages
from .parallel import (
    Parallel,
    average_gradients,
    full_model_state,
    init_parallel,
    replicate,
    shard_model,
    stream_layers,
    wire_state,
)
from .precision import MasterWeights
from .quantized import compute_weights, quantized_modules, quantizers
from .routing import PROBE_SAMPLES, MoERouting
from .schedule import LRSchedule, LRScheduler
from .step_metrics import StepMeans, StepStats

# A micro-batch's share of its optimizer step's loss: (index in the step's micro-batches, batch,
# loss token weights) -> scalar.
MicroLoss = Callable[[int, Batch, torch.Tensor], torch.Tensor]

DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _checkpoint_layers(model: torch.nn.Module) -> None:
    """Activation checkpointing per decoder layer (only while gradients are recorded)."""
    for layer in model.model.layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):  # kwargs: an MoE forward's routing
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = checkpointed


class Actor:
    """`model` holds the weights that checkpoints, the weight push and AdamW see (the fp32
    masters under `--bf16`); `compute` is the module forward and backward run on (a bf16 copy
    under `--bf16` in one process, else `model` itself).

    It takes the config sections it reads (model, train, algo) and the rollout facts the loss
    needs, passed explicitly; `from_config` wires them from the whole tree.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        train: TrainConfig,
        algo: AlgoConfig,
        *,
        global_batch_size: int,  # samples per optimizer step
        temperature: float,  # the rollout's sampling temperature: log-probs are of the same distribution
        max_response_len: int,  # --rollout-max-response-len (seq-mean-token-sum-norm's constant)
        device: str = "auto",
        model_path: str | None = None,  # a checkpoint to start from instead of --hf-checkpoint
        num_optimizer_steps: int = 0,  # the whole run's: the default span of the lr decay
        rollout_fp8: bool = False,  # --rollout-fp8: unified FP8 then rounds the projections' inputs too
        draft_path: str = "",  # --speculative-draft-model-path: the draft --enable-mtp-training starts from
        colocate: bool = False,  # --colocate: whether pushes go by CUDA IPC (their wire format follows)
    ):
        self.train, self.algo = train, algo
        self.global_batch_size, self.temperature, self.max_response_len = (
            global_batch_size, temperature, max_response_len,
        )  # fmt: skip
        self.par: Parallel = init_parallel(pick_device(device))
        self.device = self.par.device
        self.wire_format = train.effective_weight_sync_dtype(self.device.type, colocate)  # of the pushes
        self.lora = train.lora_rank > 0
        if train.true_on_policy_mode:
            check_true_on_policy_dtypes(model_cfg, train, self.device.type)
        dtype = DTYPES[model_cfg.dtype]
        if train.bf16:  # fp32 masters; a frozen LoRA base needs none (its adapters are float32)
            dtype = torch.bfloat16 if self.lora else torch.float32
        model = self._load_policy(model_cfg, model_path, dtype)
        # --bf16: a bf16 compute copy; --int4-qat / --fp8-format: one with the quantized weights
        self.masters = None if self.lora else compute_weights(model, train, self.par.enabled, rollout_fp8)
        if train.optimizer_cpu_offload and not self.par.enabled:
            # masters (loaded on the CPU), their gradients and AdamW's moments stay there
            self.masters = self.masters or MasterWeights(model, dtype=dtype)
            self.masters.compute.to(self.device)
        compute = self.masters.compute if self.masters else model
        if self.device.type == "cuda" and not train.true_on_policy_mode:
            use_grouped_experts(compute)  # MoE: the experts as grouped GEMMs (kernels/moe.py)
        if train.torch_compile:
            split_layers(compute)  # two compiled graphs per layer around the attention call
        if train.gradient_checkpointing:
            _checkpoint_layers(compute)
        self.model = model  # sharded as it was loaded, under torchrun
        self.compute = compute if self.masters else self.model
        self.invariant = train.true_on_policy_mode  # its compute copy holds the served bf16 values
        if self.invariant:
            make_invariant(self.compute)
        self.compute.train()
        self.moe = MoERouting(model.config, train)  # expert routing: replay, aux loss, metrics
        self.ref_model = None
        if needs_reference(algo):
            self.ref_model = self._load_reference(model_cfg, torch.bfloat16 if train.bf16 else dtype)
        on_gpu = self.device.type == "cuda" and not train.optimizer_cpu_offload
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],  # under LoRA the adapters
            lr=train.lr,
            betas=(train.adam_beta1, train.adam_beta2),
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
            foreach=not on_gpu,
            fused=on_gpu,
        )
        self.scheduler = LRScheduler(self.optimizer, LRSchedule.from_config(train, num_optimizer_steps))
        self.draft, self.draft_optimizer = None, None  # --enable-mtp-training (`draft.py`)
        if train.enable_mtp_training:
            self.draft = DraftTrainer(
                model.config, model_cfg.mtp_num_layers, draft_path, train.mtp_loss_scaling_factor, self.device
            )
            # Its own AdamW (the checkpoint's optimizer state is the policy's, by parameter name),
            # stepped with the policy's, at the policy's learning rate.
            self.draft_optimizer = torch.optim.AdamW(
                self.draft.parameters(), lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                eps=train.adam_eps, weight_decay=train.weight_decay,
            )  # fmt: skip

    def _load_policy(self, model_cfg: ModelConfig, model_path: str | None, dtype: torch.dtype):
        """Under torchrun each rank allocates and reads only its shard (`hf.load_model(shard=)`);
        under --optimizer-cpu-offload into CPU memory; under --lora-rank the base model
        (--hf-checkpoint, also when resuming: a checkpoint's adapters go back onto it) wrapped
        with adapters (`lora.py`)."""
        t = self.train
        shard = None
        if self.par.enabled:
            bf16 = torch.bfloat16 if t.bf16 else None

            def shard(model):  # --int4-qat / --fp8-format: their projections are gathered whole
                full_precision = quantized_modules(quantizers(t, model))
                return shard_model(model, self.par, bf16, t.optimizer_cpu_offload, full_precision)

        if self.lora:  # the base sharded as without LoRA; the adapters whole on every rank (lora.py)
            base = model_cfg.hf_checkpoint
            model = load_model(base, device=self.device, dtype=dtype, shard=shard)
            targets = lora.target_modules(t.target_modules)
            model = lora.apply_lora(model, t.lora_rank, t.lora_alpha, t.lora_dropout, targets, base)
            replicate(lora.adapter_parameters(model), self.par)
            return model
        device = torch.device("cpu") if t.optimizer_cpu_offload else self.device
        return load_model(model_path or model_cfg.hf_checkpoint, device=device, dtype=dtype, shard=shard)

    def _load_reference(self, model_cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
        """The frozen initial policy the KL terms compare with (also when resuming; forward only, so
        bf16 under --bf16): sharded like the policy under torchrun, in CPU memory under
        --ref-offload; under --lora-rank the policy itself with its adapters off, unless
        --ref-load names another model."""
        path = model_cfg.ref_load or model_cfg.hf_checkpoint
        if self.lora and path == model_cfg.hf_checkpoint:
            return self.model
        offload = self.train.ref_offload
        shard = partial(shard_model, par=self.par, cpu_offload=offload) if self.par.enabled else None
        device = torch.device("cpu") if offload else self.device
        ref = load_model(path, device=device, dtype=dtype, shard=shard)
        if offload and not self.par.enabled:
            stream_layers(ref, self.device)
        return ref.eval().requires_grad_(False)

    @property
    def draft_parts(self) -> tuple[torch.nn.Module, torch.optim.Optimizer] | None:
        """What a checkpoint keeps of --enable-mtp-training: the draft head and its AdamW."""
        if self.draft is None or self.draft_optimizer is None:
            return None
        return self.draft.head, self.draft_optimizer

    @classmethod
    def from_config(cls, cfg: Config, model_path: str | None = None) -> Actor:
        return cls(
            cfg.model, cfg.train, cfg.algo,
            global_batch_size=cfg.effective_global_batch_size,
            temperature=cfg.rollout.rollout_temperature,
            max_response_len=cfg.rollout.rollout_max_response_len,
            rollout_fp8=cfg.rollout.rollout_fp8,
            device=cfg.infra.device,
            model_path=model_path,
            draft_path=cfg.rollout.speculative_draft_model_path,
            colocate=cfg.cluster.colocate,
            num_optimizer_steps=(
                cfg.rollout.num_rollout * cfg.rollout.samples_per_rollout // cfg.effective_global_batch_size
            ),
        )  # fmt: skip

    # ---- log-probs -------------------------------------------------------------------------
    def _forward(self, model: torch.nn.Module, batch: Batch, head_fn, routing=None, keep=None):
        """`head_fn(hidden, lm_head_weight, targets, temperature=)` of `batch`, in the padded [B, T] frame;
        `routing`: an MoE policy forward's `Routing` (`routing.py`); `keep`: a dict that receives
        the final hidden states as "hidden" (the draft trains on them)."""
        t = self.temperature
        p = batch.packed
        if self.masters is not None and model is self.compute:
            self.masters.refresh_if_changed()  # e.g. a checkpoint was loaded into the masters
        extra = {} if routing is None else {"routing": routing}
        if self.invariant:  # the padded batch, through the kernels the engine decodes with
            extra["attention"], p = invariant.causal_attention, None
        if p is None:

            def padded_head(h, w):
                if keep is not None:
                    keep["hidden"] = h
                return head_fn(h, w, batch.targets, temperature=t)

            return model(batch.input_ids, head=padded_head, **extra)
        rows, cols = batch.input_ids.shape

        def head(h, w):
            if keep is not None:  # every position's, in the padded frame (the draft's input)
                keep["hidden"] = padded_hidden(h[0], p, rows, cols)
            # Response positions only, then back into the padded frame (zeros elsewhere).
            out = head_fn(h[0, p.head_rows][None], w, p.head_targets[None], temperature=t)
            outs = out if isinstance(out, tuple) else (out,)
            frame = [
                x.new_zeros(rows * cols).index_copy(0, p.head_index, x[0]).view(rows, cols) for x in outs
            ]
            return tuple(frame) if isinstance(out, tuple) else frame[0]

        attention = packed_causal_attention(p.cu_seqlens, p.max_len)
        return model(p.input_ids, positions=p.positions, attention=attention, head=head, **extra)

    def log_probs(
        self, batch: Batch, model: torch.nn.Module | None = None, routing=None, keep=None
    ) -> torch.Tensor:
        """Per-token log-probs of `batch.targets` under the current (or given) weights, [B, T];
        `routing`: a training forward's (default: the policy's for a pass without gradients);
        `keep`: receives the policy's hidden states (`_forward`)."""
        fn = compiled_token_log_probs if self.train.torch_compile else chunked_token_log_probs
        fn = invariant.token_log_probs if self.invariant else fn
        if model is not None and model is not self.compute:  # the reference routes itself
            return self._forward(model, batch, fn)
        if routing is None:
            routing = self.moe.routing(batch, training=False)
        out = self._forward(self.compute, batch, fn, routing, keep)
        self.moe.forward_done(batch, routing)
        return out

    def log_probs_and_entropy(
        self, batch: Batch, routing=None, keep=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fn = compiled_log_probs_and_entropy if self.train.torch_compile else chunked_log_probs_and_entropy
        fn = invariant.log_probs_and_entropy if self.invariant else fn
        return self._forward(self.compute, batch, fn, routing, keep)

    def old_log_probs(self, batches: list[Batch]) -> list[torch.Tensor]:
        if self.train.torch_compile:
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
        if self.ref_model is self.model:  # LoRA: the base model is the policy without its adapters
            with lora.adapters_disabled(self.model):
                return [self.log_probs(b) for b in batches]
        out = [self.log_probs(b, self.ref_model) for b in batches]
        if self.par.enabled:  # FSDP2 keeps a root unit gathered after a forward without backward
            self.ref_model.reshard()
        return out

    def _proximal(self, micro: list[Batch], steps_of_micro: list[list[int]]) -> list[torch.Tensor | None]:
        """The proximal ("old") log-probs of each micro-batch; None: its training forward gives them.

        Proximal log-probs are the weights' as they are now. Until the first optimizer step they
        are exactly what the training forward computes, so the first step's micro-batches take
        theirs from it (`_optimizer_step`) instead of a forward of their own: a quarter of the
        step's GEMMs when one optimizer step trains the whole rollout. Only where nothing needs
        them earlier (REINFORCE++ puts a KL of them in the reward) and in one process (under
        FSDP2 rank 0's metrics cover every rank's micro-batches).
        """
        if self.algo.use_rollout_logprobs:
            return [b.rollout_log_probs for b in micro]
        first: set[int] = set()
        if self.par.world_size == 1 and not self.algo.advantage_estimator.startswith("reinforce_plus_plus"):
            first = set(steps_of_micro[0]) if steps_of_micro else set()
        ahead = [i for i in range(len(micro)) if i not in first]
        old: list[torch.Tensor | None] = [None] * len(micro)
        for i, o in zip(ahead, self.old_log_probs([micro[i] for i in ahead]), strict=True):
            old[i] = o
        return old

    def warm_up(self) -> None:
        """One forward/backward of two dummy sequences, its gradients dropped; the weights, the
        optimizer and every later step are exactly as without it. On a GPU the first pass pays
        one-time costs (cuBLAS handles, kernels loaded, FlashAttention's first call): 0.5 s of the
        H200 preset's first step against 0.1 s for each later one (bench/learn_vs_trl.py); the
        loop runs this while the rollout servers produce the first samples."""
        samples = [Sample(tokens=[0] * 8, response_length=4, status=Status.COMPLETED) for _ in range(2)]
        b = self.tensors(samples, [0.0, 0.0])
        log_probs, _ = self.log_probs_and_entropy(b)
        log_probs.sum().backward()
        self.optimizer.zero_grad(set_to_none=True)
        if self.draft_optimizer is not None:
            self.draft_optimizer.zero_grad(set_to_none=True)

    # ---- one rollout step ------------------------------------------------------------------
    def tensors(self, samples: list[Sample], scores: list[float]) -> Batch:
        """One micro-batch on the device, its sequences packed end to end into one row: the
        forward never computes a pad (padded, the demo's 512 short samples cost ~1.7x the time on
        the CPU). `--true-on-policy-mode` keeps the padded frame its invariant kernels decode in."""
        return (collate if self.invariant else pack)(samples, scores).to(self.device)

    def train_rollout(
        self, samples: list[Sample], scores: list[float], trained_version: int = 0
    ) -> StepStats:
        """Train on `samples` (their loss masks already narrowed by the staleness policy).

        `scores` are the per-sample scalars of `advantages.group_scores` (the GRPO advantage,
        or the reward / centered reward for REINFORCE++); `trained_version` is the version of
        the weights being trained, for the staleness metric.
        """
        members, steps_of_micro = self.micro_batches(samples)
        micro = [self.tensors([samples[j] for j in m], [scores[j] for j in m]) for m in members]
        self.moe.start_step()
        score_rows = [
            torch.tensor([scores[j] for j in m], dtype=torch.float32, device=self.device) for m in members
        ]
        old = self._proximal(micro, steps_of_micro)
        ref = self.ref_log_probs(micro)
        for b, adv in zip(micro, token_advantages(self.algo, micro, score_rows, old, ref), strict=True):
            b.advantages = adv

        means = StepMeans()
        for b, o in zip(micro, old, strict=True):
            means.staleness(b.loss_mask, b.versions, trained_version)
            if not self.algo.use_rollout_logprobs and o is not None:
                means.logprob_diff(o, b.rollout_log_probs, b.loss_mask > 0)
        if self.moe.rollout_replay and members:  # R3's effect, on a few samples (routing.py)
            probe = [samples[j] for j in members[0][:PROBE_SAMPLES]]
            self.moe.replay_gap(self.log_probs, self.tensors(probe, [0.0] * len(probe)), means)

        def loss(i: int, b: Batch, weights: torch.Tensor) -> torch.Tensor:
            routing = self.moe.routing(b, training=True)
            keep = {} if self.draft is not None else None
            lp, entropy = self.log_probs_and_entropy(b, routing, keep)
            if old[i] is None:  # a first-step micro-batch: its proximal log-probs are these
                old[i] = lp.detach()
                means.logprob_diff(old[i], b.rollout_log_probs, b.loss_mask > 0)
            ref_i = None if ref is None else ref[i]
            policy = micro_batch_loss(self.algo, b, lp, entropy, old[i], ref_i, weights, means)
            if self.draft is not None:  # the trunk detached for it: it moves the draft only
                policy = policy + self.draft.loss(keep["hidden"], b, self.compute, weights, means)
            return policy + self.moe.training_terms(b, routing, weights, means)

        return self._optimizer_steps(micro, steps_of_micro, loss, means)

    def train_sft(self, samples: list[Sample]) -> StepStats:
        """--loss-type sft_loss: the negative log-likelihood of every sample's trained tokens
        (its loss mask: response or assistant tokens), in the same optimizer steps and micro-batches."""
        members, steps_of_micro = self.micro_batches(samples)
        micro = [self.tensors([samples[j] for j in m], [0.0] * len(m)) for m in members]
        means = StepMeans()
        self.moe.start_step()

        def loss(i: int, b: Batch, weights: torch.Tensor) -> torch.Tensor:
            routing = self.moe.routing(b, training=True)
            keep = {} if self.draft is not None else None
            lp = self.log_probs(b, routing=routing, keep=keep)
            total = sft_micro_batch_loss(lp, weights) + self.moe.training_terms(b, routing, weights, means)
            if self.draft is not None:  # SFT trains the draft alongside, as RL does
                total = total + self.draft.loss(keep["hidden"], b, self.compute, weights, means)
            return total

        return self._optimizer_steps(micro, steps_of_micro, loss, means)

    def _optimizer_steps(
        self, micro: list[Batch], steps_of_micro: list[list[int]], loss: MicroLoss, means: StepMeans
    ) -> StepStats:
        losses, norms, skipped, lr = [], [], 0, self.scheduler.lr
        for chunk in steps_of_micro:
            totals = step_totals([micro[i].loss_mask for i in chunk])
            if totals[0] == 0:
                continue
            lr = self.scheduler.lr
            done = self._optimizer_step([(i, micro[i]) for i in chunk], totals, loss)
            if done is None:
                skipped += 1
            else:
                losses.append(done[0])
                norms.append(done[1])
        stats = means.stats(losses, norms, sum(b.num_tokens for b in micro), skipped)
        stats.metrics["lr"] = lr  # the step's last optimizer step's (slime's train/lr-pg_0)
        return stats

    def _optimizer_step(
        self, chunk: list[tuple[int, Batch]], totals: tuple[int, int], loss: MicroLoss
    ) -> tuple[float, float] | None:
        """One AdamW step over the micro-batches `chunk`: (loss, gradient norm), or None if skipped."""
        world, rank = self.par.world_size, self.par.rank
        step_tokens, step_seqs = totals
        self.optimizer.zero_grad(set_to_none=True)
        if self.draft_optimizer is not None:
            self.draft_optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for j, (i, b) in enumerate(chunk):
            if j % world != rank or (b.num_tokens == 0 and world == 1):
                # Another rank's micro-batch. (An empty one is still run under FSDP: every
                # rank must join the same number of forward/backward collectives.)
                continue
            weights = loss_token_weights(
                b.loss_mask, self.algo.loss_agg_mode, step_tokens=step_tokens, step_seqs=step_seqs,
                max_len=self.max_response_len,
            )  # fmt: skip
            micro_loss = loss(i, b, weights)
            (micro_loss * world).backward()  # FSDP averages gradients over ranks
            step_loss = step_loss + micro_loss.detach().double()  # on the device: no sync per micro-batch
        if self.lora:  # replicated adapters: averaged here as FSDP averages the sharded weights
            average_gradients(lora.adapter_parameters(self.model), world)
        return self._step_if_finite(step_loss)

    def _step_if_finite(self, step_loss) -> tuple[float, float] | None:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.clip_grad)
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
            return None
        if self.draft_optimizer is not None:
            self.draft.reduce_gradients(self.par.world_size)  # replicated under FSDP2 (`draft.py`)
            torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.train.clip_grad)
            for group in self.draft_optimizer.param_groups:
                group["lr"] = self.optimizer.param_groups[0]["lr"]
            self.draft_optimizer.step()
        self.optimizer.step()
        self.scheduler.step()
        if self.masters is not None:
            self.masters.refresh()
        return loss_f, norm_f

    def micro_batches(self, samples: list[Sample]) -> tuple[list[list[int]], list[list[int]]]:
        """(sample indices of each micro-batch, micro-batch indices of each optimizer step)."""
        t = self.train
        return plan_micro_batches(
            samples,
            global_batch_size=self.global_batch_size,
            micro_batch_size=t.effective_micro_batch_size(
                self.global_batch_size, self.device.type, self.par.world_size
            ),
            max_tokens_per_gpu=t.max_tokens_per_gpu if t.use_dynamic_batch_size else None,
            world=self.par.world_size,
        )

    def state_dict_for_sync(self) -> dict[str, torch.Tensor]:
        """The full weights to push (a collective under FSDP2; only rank 0's result is used). Under
        FSDP2 with an FP8 or int4 push, quantized shard by shard (`parallel.wire_state`)."""
        if self.par.enabled and self.wire_format in ("fp8", "int4") and not self.lora:
            full = wire_state(self.model, self.par, self.wire_format, self.train.int4_qat_targets)
        else:
            full = full_model_state(self.model) if self.par.enabled else self.model.state_dict()
        full = lora.policy_weights(self.model, full)  # under LoRA the merged weights
        tied = self.model.config.tie_word_embeddings
        weights = {k: v.detach() for k, v in weights_to_sync(full, tied).items()}
        if self.draft is not None:  # the draft travels in the same version (`draft.py`)
            weights.update(self.draft.state_dict())
        return weights
