"""The policy being trained: its model, reference and optimizer, and the forwards that give log-probs.

The Actor's step, one rollout's worth of optimizer steps on these, is `steps.py`. The reference
model is loaded once (`--ref-load`, default `--hf-checkpoint`), frozen, and only ever run under
no_grad.

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

Under torchrun the policy is sharded with FSDP2 (`parallel.py`); how a step's micro-batches are
shared among the ranks is `steps.py`'s.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

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

from . import lora, steps
from .batch import Batch, collate, pack
from .compiled_layers import split_layers
from .draft import DraftTrainer, padded_hidden
from .objective import needs_reference
from .parallel import (
    Parallel,
    full_model_state,
    init_parallel,
    replicate,
    shard_model,
    stream_layers,
    wire_state,
)
from .precision import MasterWeights
from .quantized import compute_weights, quantized_modules, quantizers
from .routing import MoERouting
from .schedule import LRSchedule, LRScheduler
from .step_metrics import StepStats

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

    # ---- one rollout step (`steps.py`) -----------------------------------------------------
    def tensors(self, samples: list[Sample], scores: list[float]) -> Batch:
        """One micro-batch on the device, its sequences packed end to end into one row: the
        forward never computes a pad (padded, the demo's 512 short samples cost ~1.7x the time on
        the CPU). `--true-on-policy-mode` keeps the padded frame its invariant kernels decode in."""
        return (collate if self.invariant else pack)(samples, scores).to(self.device)

    def train_rollout(
        self, samples: list[Sample], scores: list[float], trained_version: int = 0
    ) -> StepStats:
        return steps.train_rollout(self, samples, scores, trained_version)

    def train_sft(self, samples: list[Sample]) -> StepStats:
        return steps.train_sft(self, samples)

    def micro_batches(self, samples: list[Sample]) -> tuple[list[list[int]], list[list[int]]]:
        return steps.micro_batches(self, samples)

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
