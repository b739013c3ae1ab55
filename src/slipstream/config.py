"""One typed config tree for every service, and the command-line flags that fill it.

The tree is a handful of nested dataclasses (`Config.model`, `Config.rollout`, ...). Every
field is also a command-line flag named after the field with dashes: `rollout_batch_size`
becomes `--rollout-batch-size`. Field names are slime/miles' argument names wherever slime
has the same knob, so a slime command line mostly works unchanged; the few we add
(`--run-dir`, `--redis-url`, `--rollout-num-servers`, `--weight-sync-dtype`, ...) say so in
their help.

Values resolve in this order: field defaults, then a JSON/YAML file given by `--config`,
then `SLIPSTREAM_<FIELD>` environment variables (`SLIPSTREAM_REDIS_URL=...`: how containers
are configured), then flags. Every service reads the same resolved file (the launcher writes
it into the run directory) plus a few per-process flags such as `--port`.

`Config.as_namespace()` gives the flat `argparse.Namespace` that slime hooks receive as
`args` (for example `--custom-rm-path` functions), so those hooks port without changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its flag help text (the field docstring, in one place)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """A config value that cannot work; the CLI prints it as one line."""


@dataclass
class ModelConfig:
    hf_checkpoint: str = opt("", "Hugging Face model directory (config.json, *.safetensors, tokenizer).")
    ref_load: str = opt("", "Reference model for the KL loss (defaults to --hf-checkpoint).")
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto",
        "Parameter dtype: auto = float32 (the trainer keeps float32 weights; GPU bf16 comes with --dtype bfloat16). (Slipstream)",
    )
    mtp_num_layers: int = opt(
        0,
        "MTP layers of the speculative draft head (DeepSeek-V3's multi-token-prediction module on the "
        "target's last hidden state, sharing its embedding and LM head; models/draft.py); 0 = no draft.",
    )

    def rollout_dtype(self, device_type: str) -> str:
        """The dtype the rollout engine computes in: --dtype, or when auto bfloat16 on CUDA, else float32."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device_type.startswith("cuda") else "float32"


@dataclass
class DataConfig:
    prompt_data: str = opt("", "Prompt dataset: JSONL (one object per line) or Parquet.")
    input_key: str = opt("prompt", "Key of the prompt in each record.")
    label_key: str = opt(
        "label",
        "Key of the ground-truth label in each record; under --loss-type sft_loss, of the response "
        "(a record whose --input-key holds chat messages needs none: its assistant turns are trained).",
    )
    metadata_key: str = opt("metadata", "Key of per-record metadata passed through to the reward.")
    apply_chat_template: bool = opt(False, "Wrap each prompt in the tokenizer's chat template.")
    rollout_shuffle: bool = opt(False, "Shuffle prompts each epoch.")
    num_epoch: int = opt(
        0,
        "Passes over --prompt-data; sets --num-rollout to num-epoch x records / rollout-batch-size "
        "(0 = use --num-rollout). Read under --loss-type sft_loss only, for now.",
    )
    eval_prompt_data: list[str] = opt(
        [],
        "Evaluation sets as NAME PATH pairs (JSONL/Parquet with --input-key/--label-key records), "
        "generated on the rollout fleet at one pinned version while training goes on; metrics "
        "eval/NAME/accuracy, eval/NAME/pass@k, eval/NAME/response_len_mean.",
    )
    eval_interval: int = opt(
        0, "Evaluate every this many policy versions, and at version 0 and the last step; 0 = no evaluation."
    )
    n_samples_per_eval_prompt: int = opt(1, "Responses sampled per evaluation prompt (the k of pass@k).")
    eval_temperature: float | None = opt(
        None, "Evaluation sampling temperature; unset = --rollout-temperature."
    )
    eval_top_p: float | None = opt(None, "Evaluation nucleus threshold; unset = --rollout-top-p.")
    eval_max_response_len: int | None = opt(
        None, "Most tokens per evaluation response; unset = --rollout-max-response-len."
    )

    def __post_init__(self) -> None:
        pairs = self.eval_prompt_data
        _require(len(pairs) % 2 == 0, "--eval-prompt-data takes NAME PATH pairs")
        names = pairs[0::2]
        _require(len(set(names)) == len(names), "--eval-prompt-data: each NAME once")
        _require(self.eval_interval >= 0, "--eval-interval must be >= 0")
        _require(
            bool(pairs) == (self.eval_interval > 0),
            "--eval-prompt-data and --eval-interval go together (evaluation needs both)",
        )
        _require(self.n_samples_per_eval_prompt >= 1, "--n-samples-per-eval-prompt must be at least 1")
        _require(
            self.eval_temperature is None or self.eval_temperature >= 0, "--eval-temperature must be >= 0"
        )
        _require(self.eval_top_p is None or 0 < self.eval_top_p <= 1, "--eval-top-p must be in (0, 1]")
        _require(
            self.eval_max_response_len is None or self.eval_max_response_len > 0,
            "--eval-max-response-len must be positive",
        )

    @property
    def eval_sets(self) -> list[tuple[str, str]]:
        """--eval-prompt-data as (name, path) pairs."""
        return list(zip(self.eval_prompt_data[0::2], self.eval_prompt_data[1::2], strict=True))


@dataclass
class RolloutConfig:
    rollout_batch_size: int = opt(32, "Prompts per rollout step (groups per training step).")
    n_samples_per_prompt: int = opt(8, "Responses sampled per prompt (the GRPO group size).")
    num_rollout: int = opt(100, "Number of rollout/training steps to run.")
    rollout_max_prompt_len: int = opt(1024, "Prompts longer than this (in tokens) are rejected.")
    rollout_max_response_len: int = opt(1024, "Most tokens generated per response.")
    rollout_temperature: float = opt(1.0, "Sampling temperature.")
    rollout_top_p: float = opt(1.0, "Nucleus sampling threshold.")
    rollout_top_k: int = opt(-1, "Top-k sampling; -1 disables it.")
    rollout_stop_token_ids: list[int] = opt([], "Extra token ids that end a response (EOS always does).")
    rollout_num_servers: int = opt(
        2,
        "Rollout servers the launcher starts. Not given, on a GPU shared with the trainer: 1, or 4 for a "
        "model under 100M parameters (placement.shared_gpu_servers). (Slipstream)",
    )
    rollout_max_batch_size: int = opt(256, "Most sequences one rollout server decodes at once. (Slipstream)")
    rollout_attach_grace: float = opt(
        0.0,
        "Seconds a fresh run's coordinator waits, after the first rollout server attached, for all "
        "--rollout-num-servers of them before its first dispatch (0 = dispatch at once; the launcher, "
        "which starts every service at the same moment, uses 20 when this is 0). (Slipstream)",
    )
    rollout_fp8: bool = opt(
        False,
        "Run the rollout engine's linear projections in FP8 (e4m3, row-wise scales; FP8 tensor cores "
        "on Hopper, a dequantizing fallback elsewhere). An MoE's routed experts stay in the engine's "
        "dtype (no FP8 grouped GEMM): FP8 versions bring them dequantized. (Slipstream)",
    )
    kv_cache_dtype: Literal["auto", "fp8_e4m3"] = opt(
        "auto",
        "Rollout KV-cache dtype: auto (the model's) or fp8_e4m3 (scale 1, saturating; half the cache "
        "bytes, which is what a large-batch decode step reads). SGLang's --kv-cache-dtype, slime's "
        "--sglang-kv-cache-dtype.",
    )
    max_staleness: int = opt(
        1,
        "Largest allowed gap, in policy versions, between the trained policy and the oldest "
        "token of a trained batch; the coordinator admits new prompts only within it. (AReaL's eta)",
    )
    rollout_engine: Literal["native", "sglang"] = opt("native", "Inference engine of rollout servers.")
    sync: bool = opt(
        False,
        "Strict on-policy baseline: generate, train, update, repeat (sets --max-staleness 0; servers "
        "drain). (Slipstream)",
    )
    partial_rollout: bool = opt(
        False,
        "Recycle unfinished samples instead of draining: on a weight update (per "
        "--pause-generation-mode) they are continued under the new weights, keeping what was generated.",
    )
    pause_generation_mode: Literal["abort", "in_place"] = opt(
        "abort",
        "With --partial-rollout, what a weight update does to requests in flight: abort (return the "
        "partial trajectory, continue it under the new weights) or in_place (swap between decode "
        "steps, keep the KV cache). Without --partial-rollout servers drain (finish on the old weights).",
    )
    over_sampling_batch_size: int = opt(
        0,
        "Groups dispatched per rollout step (>= --rollout-batch-size; 0 = --rollout-batch-size): the "
        "first that pass --dynamic-sampling-filter-path fill the batch, the rest are aborted and "
        "recycled into the next round.",
    )
    speculative_algorithm: Literal["", "EAGLE", "MTP"] = opt(
        "",
        "Speculative decoding in the native engine: EAGLE or MTP (the same --mtp-num-layers draft "
        "head, drafted autoregressively and verified exactly: the sampled tokens keep the target's "
        "distribution); empty = off. Pays only at small batches with a draft trained online "
        "(--enable-mtp-training) that follows the policy; on the H200 it is 1.5-1.8x plain decode at "
        "batch 1, 1.5-1.6x at 16, 1.3-1.4x at 64 and even at 256 (docs/benchmarks.md, issue 19). "
        "slime's --sglang-speculative-algorithm.",
        aliases=["--sglang-speculative-algorithm"],
    )
    speculative_num_steps: int = opt(
        3, "Draft tokens proposed per verify step. slime's --sglang-speculative-num-steps.",
        aliases=["--sglang-speculative-num-steps"],
    )  # fmt: skip
    speculative_eagle_topk: int = opt(
        1, "Draft branches per step; only 1 (a chain) is implemented. slime's --sglang-speculative-eagle-topk.",
        aliases=["--sglang-speculative-eagle-topk"],
    )  # fmt: skip
    speculative_num_draft_tokens: int = opt(
        4,
        "Tokens one verify forward checks: num-steps + 1 with top-k 1. slime's "
        "--sglang-speculative-num-draft-tokens.",
        aliases=["--sglang-speculative-num-draft-tokens"],
    )
    speculative_draft_model_path: str = opt(
        "",
        "Draft head to start from (a directory save_draft wrote: config.json with "
        "num_nextn_predict_layers, model.safetensors); empty = a seeded random init, the same in the "
        "trainer and every rollout server. slime's --sglang-speculative-draft-model-path.",
        aliases=["--sglang-speculative-draft-model-path"],
    )
    dynamic_sampling_filter_path: str = opt(
        "",
        "module:function(args, samples, **kwargs) -> bool keeping a finished group or not (slime's "
        "signature); built-in: slipstream.rollout_filters:check_reward_nonzero_std.",
    )

    custom_generate_function_path: str = opt(
        "",
        "async generate(args, sample, sampling_params) -> Sample run on each rollout server for every "
        "sample (slime's signature: multi-turn, tools; tool tokens get loss_mask 0); module:function, "
        "dotted module.function or file.py:function. The launcher then starts each server's HTTP API "
        "and points --sglang-router-ip/--sglang-router-port at it.",
    )
    custom_generate_max_turns: int = opt(
        16,
        "Most model turns of one --custom-generate-function-path trajectory: later turns get nothing "
        "(in-process client) or are cut off (TRUNCATED). (Slipstream)",
    )
    custom_generate_timeout: float = opt(
        600.0,
        "Seconds one --custom-generate-function-path call may run before it is cancelled and its "
        "sample comes back TRUNCATED; 0 = no limit. (Slipstream)",
    )

    def __post_init__(self) -> None:
        _require(self.rollout_batch_size > 0, "--rollout-batch-size must be positive")
        _require(self.custom_generate_max_turns >= 1, "--custom-generate-max-turns must be at least 1")
        _require(self.custom_generate_timeout >= 0, "--custom-generate-timeout must be >= 0")
        _require(self.n_samples_per_prompt > 0, "--n-samples-per-prompt must be positive")
        _require(self.num_rollout > 0, "--num-rollout must be positive")
        _require(self.rollout_max_response_len > 0, "--rollout-max-response-len must be positive")
        _require(self.rollout_temperature >= 0, "--rollout-temperature must be >= 0")
        _require(0 < self.rollout_top_p <= 1, "--rollout-top-p must be in (0, 1]")
        _require(self.rollout_num_servers >= 1, "--rollout-num-servers must be at least 1")
        _require(self.max_staleness >= 0, "--max-staleness must be >= 0")
        _require(self.rollout_attach_grace >= 0, "--rollout-attach-grace must be >= 0")
        _require(
            self.over_sampling_batch_size == 0 or self.over_sampling_batch_size >= self.rollout_batch_size,
            "--over-sampling-batch-size must be >= --rollout-batch-size (or 0)",
        )
        _require(
            self.rollout_engine == "native",
            f"--rollout-engine {self.rollout_engine}: not supported; the native engine is the only one "
            "(every rollout server speaks SGLang's HTTP /generate with --http-port)",
        )
        _require(
            self.speculative_eagle_topk == 1,
            f"--speculative-eagle-topk {self.speculative_eagle_topk}: not supported (only 1: chain drafting)",
        )
        _require(self.speculative_num_steps >= 1, "--speculative-num-steps must be at least 1")
        _require(
            self.speculative_num_draft_tokens == self.speculative_num_steps + 1,
            f"--speculative-num-draft-tokens {self.speculative_num_draft_tokens}: not supported (with "
            "--speculative-eagle-topk 1 it is --speculative-num-steps + 1)",
        )
        if self.sync:
            _require(not self.partial_rollout, "--sync drains; it cannot be combined with --partial-rollout")
            _require(
                self.effective_over_sampling_batch_size == self.rollout_batch_size,
                "--sync cannot over-sample (--over-sampling-batch-size > --rollout-batch-size)",
            )

    @property
    def samples_per_rollout(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def effective_over_sampling_batch_size(self) -> int:
        """Groups dispatched per rollout step: --over-sampling-batch-size, or the batch when 0."""
        return self.over_sampling_batch_size or self.rollout_batch_size

    @property
    def effective_max_staleness(self) -> int:
        """The staleness bound in force: --max-staleness, or 0 under --sync."""
        return 0 if self.sync else self.max_staleness


@dataclass
class AlgoConfig:
    advantage_estimator: Literal["grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"] = opt(
        "grpo",
        "How advantages are computed: grpo (group-normalized reward), gspo (GRPO advantages, "
        "sequence-level ratio clipped per sequence), reinforce_plus_plus (token-level discounted "
        "returns with the KL penalty in the reward), reinforce_plus_plus_baseline (group-mean "
        "baseline); the last two need --normalize-advantages, as in slime.",
    )
    disable_grpo_std_normalization: bool = opt(False, "GRPO: subtract the group mean only (Dr.GRPO).")
    normalize_advantages: bool = opt(False, "Whiten advantages over every trained token of the rollout step.")
    kl_coef: float = opt(
        0.0, "KL penalty in the reward (reinforce_plus_plus*), against the --ref-load model."
    )
    gamma: float = opt(1.0, "Discount of the token-level returns (reinforce_plus_plus).")
    use_kl_loss: bool = opt(False, "Add a KL loss against the frozen reference model (--ref-load).")
    kl_loss_coef: float = opt(0.0, "Weight of the KL loss.")
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = opt(
        "k1", "KL estimator of --use-kl-loss and --kl-coef (Schulman's k1/k2/k3; low_var_kl = k3 clamped)."
    )
    eps_clip: float = opt(0.2, "PPO clip range (lower side, and upper when --eps-clip-high is unset).")
    eps_clip_high: float | None = opt(None, "PPO clip range, upper side (DAPO clip-higher).")
    use_tis: bool | None = opt(
        None,
        "Truncated importance sampling against the rollout log-probs (decoupled PPO: weight each "
        "token by the clipped proximal/behaviour ratio). Unset = on, except under "
        "--use-rollout-logprobs, where the ratio is 1; --no-use-tis turns it off. On by default "
        "since issue 14: without it nothing corrects stale or FP8-sampled tokens when one optimizer "
        "step trains a rollout (ppo_kl and pg_clipfrac are then exactly 0).",
    )
    tis_clip: float = opt(2.0, "Upper truncation of the TIS weight.")
    tis_clip_low: float = opt(0.0, "Lower truncation of the TIS weight.")
    tis_level: Literal["token", "sequence", "geometric"] = opt(
        "token",
        "TIS weight per token, per sequence (product of token ratios), or per sequence as their "
        "geometric mean (slime's mis.py tis_level). (Slipstream)",
    )
    use_mis: bool = opt(
        False,
        "Masked importance sampling: drop from the loss tokens (or sequences) whose behaviour ratio "
        "proximal/rollout leaves [--mis-low, --mis-high] (slime's mis.py use_rs). (Slipstream)",
    )
    mis_low: float = opt(0.5, "Lower edge of the MIS band. (Slipstream)")
    mis_high: float = opt(2.0, "Upper edge of the MIS band. (Slipstream)")
    mis_level: Literal["token", "sequence", "geometric"] = opt(
        "token", "MIS ratio per token, per sequence (product), or geometric mean. (Slipstream)"
    )
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = opt(
        "token-mean",
        "How per-token losses become one number (verl's name): token-mean (every token weighs the "
        "same; slime's --calculate-per-token-loss), seq-mean-token-mean (slime's default), "
        "seq-mean-token-sum-norm (Dr.GRPO: token sums over a constant --rollout-max-response-len). (Slipstream)",
    )
    stale_sample_policy: Literal["drop", "correct"] = opt(
        "drop",
        "A sample older than --max-staleness versions when trained: drop (out of the loss, counted) "
        "or correct (trained, with --use-tis/--use-mis). (Slipstream)",
    )
    mask_offpolicy_in_partial_rollout: bool = opt(
        False, "Train only the newest-version segment of a partial rollout; older segments are masked."
    )
    entropy_coef: float = opt(0.0, "Weight of the entropy bonus.")
    use_rollout_logprobs: bool = opt(
        False, "Use the engine's log-probs as the old policy instead of recomputing them."
    )
    loss_type: Literal["policy_loss", "sft_loss"] = opt(
        "policy_loss",
        "What the trainer minimises: policy_loss (RL through the mesh) or sft_loss (supervised "
        "fine-tuning: cross-entropy on the response/assistant tokens of --prompt-data, the trainer "
        "alone, no rollout, reward or buffer; `slipstream train --loss-type sft_loss`).",
    )

    def __post_init__(self) -> None:
        _require(self.eps_clip > 0, "--eps-clip must be positive")
        _require(self.tis_clip > self.tis_clip_low >= 0, "--tis-clip must exceed --tis-clip-low >= 0")
        _require(self.mis_high > self.mis_low >= 0, "--mis-high must exceed --mis-low >= 0")
        _require(0 <= self.gamma <= 1, "--gamma must be in [0, 1]")
        _require(self.kl_coef >= 0 and self.kl_loss_coef >= 0, "--kl-coef and --kl-loss-coef must be >= 0")
        _require(
            not (self.kl_coef and self.use_kl_loss and self.kl_loss_coef),
            "only one of --kl-coef and --kl-loss-coef can be set (as in slime)",
        )
        _require(
            self.normalize_advantages or not self.advantage_estimator.startswith("reinforce_plus_plus"),
            f"--advantage-estimator {self.advantage_estimator} needs --normalize-advantages (as in slime)",
        )
        _require(
            not (self.use_rollout_logprobs and (self.use_tis or self.use_mis)),
            "--use-rollout-logprobs makes the behaviour ratio 1: it cannot go with --use-tis/--use-mis",
        )
        _require(
            self.stale_sample_policy != "correct" or self.effective_use_tis or self.use_mis,
            "--stale-sample-policy correct needs --use-tis or --use-mis",
        )
        _require(
            self.loss_type == "policy_loss" or not (self.kl_coef or (self.use_kl_loss and self.kl_loss_coef)),
            "--loss-type sft_loss has no reference model: --kl-coef and --use-kl-loss do not apply",
        )

    @property
    def effective_use_tis(self) -> bool:
        """TIS in force: --use-tis as given, or when unset on unless --use-rollout-logprobs."""
        return (not self.use_rollout_logprobs) if self.use_tis is None else self.use_tis

    @property
    def effective_eps_clip_high(self) -> float:
        """The upper PPO clip: --eps-clip-high, or --eps-clip when unset."""
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high


@dataclass
class TrainConfig:
    lr: float = opt(1e-6, "Learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.98, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon (Megatron's --adam-eps).")
    lr_decay_style: Literal["constant", "linear", "cosine"] = opt(
        "constant",
        "Learning-rate schedule after the warmup (Megatron's names): constant --lr, or a linear or "
        "cosine decay from --lr to --min-lr over --lr-decay-iters. Counted in optimizer steps, like "
        "every --lr-* flag: one rollout step holds several under --global-batch-size.",
    )
    lr_decay_iters: int = opt(
        0,
        "Optimizer steps the decay spans, warmup included; 0 = the whole run (num-rollout x "
        "rollout-batch-size x n-samples-per-prompt / global-batch-size). --min-lr after it.",
    )
    lr_warmup_iters: int = opt(
        0, "Optimizer steps of linear warmup from --lr-warmup-init to --lr (Megatron's semantics)."
    )
    lr_warmup_fraction: float | None = opt(
        None, "Warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)."
    )
    lr_warmup_init: float = opt(0.0, "Learning rate the warmup starts from.")
    min_lr: float = opt(0.0, "Learning rate at the end of the decay (linear, cosine).")
    clip_grad: float = opt(1.0, "Gradient-norm clipping threshold.")
    global_batch_size: int = opt(
        0, "Samples per optimizer step; 0 = rollout-batch-size x n-samples-per-prompt (one step per rollout)."
    )
    micro_batch_size: int = opt(
        0,
        "Samples per forward/backward pass (ignored under --use-dynamic-batch-size). 0 = auto: on a "
        "CPU trainer the whole optimizer step in one pass (at small sizes each pass costs per-op "
        "overhead, not FLOPs: 512 samples in passes of 8 took 2.5x one pass), on a GPU 8.",
    )
    use_dynamic_batch_size: bool = opt(
        False,
        "Form micro-batches by token budget instead of sample count: first fit of each optimizer "
        "step's samples into micro-batches of at most --max-tokens-per-gpu tokens. Either way each "
        "micro-batch is packed into one row: no forward computes a pad; attention stays inside each sequence.",
    )
    max_tokens_per_gpu: int = opt(
        0, "Token budget of one micro-batch under --use-dynamic-batch-size (a longer sample sits alone)."
    )
    gradient_checkpointing: bool = opt(
        False,
        "Recompute each decoder layer's activations in backward instead of keeping them (slime's FSDP "
        "backend name; Megatron's --recompute-granularity full).",
    )
    bf16: bool = opt(
        False,
        "Mixed precision: float32 master weights and AdamW state (what checkpoints and the weight "
        "push hold, whatever --dtype says); forward and backward run on a bf16 copy refreshed once "
        "per optimizer step, gradients accumulate in float32 (FSDP2's MixedPrecisionPolicy under "
        "torchrun).",
    )
    int4_qat: bool = opt(
        False,
        "INT4 quantization-aware training: the --int4-qat-targets weights compute forward with their "
        "group-128 int4 rounding (fp32 masters, straight-through gradients), the very weights the "
        "rollout serves from --weight-sync-dtype int4 (which it needs; auto picks it). (miles' INT4 QAT)",
    )
    int4_qat_targets: Literal["auto", "linear", "experts"] = opt(
        "auto",
        "Which weights are int4 under --int4-qat and --weight-sync-dtype int4: linear (every "
        "q/k/v/o and gate/up/down projection; never embeddings, LM head, norms or routers), experts "
        "(the routed experts' projections only), auto = experts on an MoE model, else linear. "
        "(Slipstream)",
    )
    fp8_format: Literal["e4m3"] | None = opt(
        None,
        "Unified FP8: the trainer's linear projections and routed experts compute forward with the "
        "same 128x128 block-quantized e4m3 weights the FP8 push delivers (fp32 masters, straight-through "
        "gradients), so rollout and training use the same numbers; needs --weight-sync-dtype fp8 "
        "(auto picks it). Unset = off. (Megatron's name; only e4m3)",
    )
    fp8_recipe: Literal["blockwise"] = opt(
        "blockwise",
        "Scaling of --fp8-format: blockwise (one fp32 scale per 128x128 weight block, DeepSeek-V3's, "
        "the wire's). (Megatron's name; its delayed/tensorwise/mxfp8 recipes are not implemented)",
    )
    torch_compile: bool = opt(
        False,
        "torch.compile the trainer: each decoder layer as two graphs around its attention call "
        "(which stays eager) and the LM head's log-prob/entropy chunks. (Slipstream)",
    )
    true_on_policy_mode: bool = opt(
        False,
        "Bitwise on-policy training: rollout engine and trainer compute every token with batch-invariant "
        "kernels (kernels/invariant.py) and the same bf16-valued weights (the wire's, in both), so the "
        "log-probs the sampler reports for its tokens equal the trainer's bit for bit (train/rollout "
        "mismatch exactly 0). CPU (fp32) and CUDA (Triton kernels; add --bf16 for the engine's bf16), "
        "dense and MoE models, one trainer process, bf16 weight sync; it costs throughput "
        "(docs/benchmarks.md). (miles' name)",
    )
    use_rollout_routing_replay: bool = opt(
        False,
        "Rollout routing replay (R3, mixture-of-experts models): the training forwards use the expert "
        "ids the rollout engine routed each token to (prompt included, Sample.rollout_routed_experts); "
        "gate weights are recomputed from the trainer's router over those ids, so the router still "
        "trains. A token without a record routes itself. The reference model routes itself.",
    )
    use_routing_replay: bool = opt(
        False,
        "Routing replay (R2, mixture-of-experts models): a micro-batch's later forwards in a step (the "
        "training pass after the proximal pass) use the experts its first forward chose. Implied by "
        "--use-rollout-routing-replay, whose ids then serve every pass. (One optimizer step per rollout "
        "step in one process has no earlier pass: the training forward gives the proximal log-probs.)",
    )
    moe_aux_loss_coeff: float | None = opt(
        None,
        "Weight of the mixture-of-experts load-balancing loss (Switch Transformer's, Megatron's flag "
        "name); unset = the checkpoint's router_aux_loss_coef (transformers' Qwen3-MoE: 0.001), 0 = off.",
    )
    optimizer_cpu_offload: bool = opt(
        False,
        "Keep the float32 master weights, their gradients and the AdamW moments in CPU memory and step "
        "AdamW there (Megatron's name); the device holds only the compute weights (bf16 under --bf16). "
        "Under torchrun FSDP2's CPUOffloadPolicy (each rank's shards on the CPU).",
    )
    ref_offload: bool = opt(
        False,
        "Keep the reference model (KL losses) in CPU memory, each decoder layer copied to the device "
        "only for its forward (FSDP2's CPUOffloadPolicy under torchrun, where it is sharded in any case).",
    )
    lora_rank: int = opt(
        0,
        "LoRA rank: train low-rank adapters on --target-modules instead of the whole model (peft); "
        "only the adapters get optimizer state, pushes and checkpoints carry the merged weights, "
        "checkpoints also the adapters in PEFT's format (adapter/). 0 = full fine-tuning.",
    )
    lora_alpha: float = opt(16.0, "LoRA alpha: the adapters' update is scaled by alpha / rank.")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch's input while training.")
    target_modules: str = opt(
        "all-linear",
        "Modules LoRA adapts, PEFT's names, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,"
        "up_proj,down_proj); all-linear = all of those.",
    )
    update_weights_interval: int = opt(1, "Push new weights to rollout every N training steps.")
    max_reuse: int = opt(
        1,
        "Most times one group is trained; above 1, a trained group is requeued and fills later steps "
        "when fresh groups are short, while within --max-staleness; requeued groups become readable at "
        "the next checkpoint (--save-interval). (Slipstream)",
    )
    weight_sync_dtype: Literal["auto", "fp8", "bf16", "int4"] = opt(
        "auto",
        "Wire format of weight pushes: FP8 e4m3 with 128x128 block scales, bf16, or int4 (the "
        "--int4-qat-targets weights as group-128 symmetric int4, two a byte plus fp32 scales, served "
        "W4A16; the rest bf16). auto = int4 under --int4-qat, fp8 under --fp8-format or when the "
        "trainer runs on a GPU (half the bytes), else bf16 (on a CPU trainer FP8 buys nothing: the "
        "push is not what a step waits on, and the rounding costs the sampler's agreement with the "
        "trainer). (Slipstream)",
    )
    weight_transport: Literal["auto", "bytes", "shm", "broadcast", "ipc"] = opt(
        "auto",
        "How a weights version's bytes reach the rollout servers (the manifest, versions and hashes "
        "always go over gRPC): bytes (streamed through the coordinator), shm (written once to a "
        "/dev/shm file every server on the trainer's host maps; bytes for a server elsewhere), "
        "broadcast (torch.distributed gloo broadcast from the trainer to the attached servers, which "
        "join its weights group at the --host address; bytes for one that cannot), ipc (CUDA IPC "
        "handles of the trainer's GPU buffer; needs --colocate on a GPU). auto = ipc when colocated "
        "on a GPU, shm when every rollout server is on the trainer's host, else bytes. (Slipstream)",
    )
    enable_mtp_training: bool = opt(
        False,
        "Train the --mtp-num-layers draft head online on the rollout tokens (its own optimizer "
        "state, the trunk detached for it) and ship it with every weights version, so a rollout "
        "server's draft is never older than the policy it drafts for.",
    )
    mtp_loss_scaling_factor: float = opt(
        0.2, "Weight of the draft loss added to the policy loss under --enable-mtp-training."
    )
    save: str = opt("", "Directory for checkpoints (defaults to <run-dir>/checkpoints).")
    save_interval: int = opt(
        0,
        "Save a checkpoint every N steps; buffer entries are acknowledged only at checkpoints, so a "
        "killed trainer resumes exactly (0 = only at the end).",
    )
    load: str = opt("", "Checkpoint directory to resume from.")
    max_nonfinite_steps: int = opt(
        3,
        "Optimizer steps with a non-finite loss or gradient are skipped (weights unchanged); this many "
        "in a row stop the run with an error and a checkpoint of the last good state. (Slipstream)",
    )
    seed: int = opt(1234, "Random seed (data order, sampling, init).")

    def __post_init__(self) -> None:
        _require(self.max_reuse >= 1, "--max-reuse must be at least 1")
        _require(self.lr > 0, "--lr must be positive")
        _require(self.micro_batch_size >= 0, "--micro-batch-size must be >= 0 (0 = auto)")
        _require(
            not self.use_dynamic_batch_size or self.max_tokens_per_gpu > 0,
            "--use-dynamic-batch-size needs a positive --max-tokens-per-gpu",
        )
        _require(self.max_tokens_per_gpu >= 0, "--max-tokens-per-gpu must be >= 0")
        _require(self.global_batch_size >= 0, "--global-batch-size must be >= 0")
        _require(self.update_weights_interval > 0, "--update-weights-interval must be positive")
        _require(self.max_nonfinite_steps >= 1, "--max-nonfinite-steps must be at least 1")
        _require(
            not (self.int4_qat and self.fp8_format),
            "--int4-qat and --fp8-format train against two different roundings: pick one",
        )
        _require(
            not self.true_on_policy_mode
            or not (self.int4_qat or self.fp8_format or self.torch_compile)
            and self.weight_sync_dtype in ("auto", "bf16"),
            "--true-on-policy-mode computes with the bf16 weights it syncs: it excludes --int4-qat, "
            "--fp8-format, --torch-compile and a --weight-sync-dtype other than bf16",
        )
        _require(
            not self.int4_qat or self.weight_sync_dtype in ("auto", "int4"),
            f"--int4-qat trains against the int4 weights the rollout serves: it needs --weight-sync-dtype "
            f"int4 (or auto), got {self.weight_sync_dtype}",
        )
        _require(
            not self.fp8_format or self.weight_sync_dtype in ("auto", "fp8"),
            f"--fp8-format trains against the FP8 blocks the rollout serves: it needs --weight-sync-dtype "
            f"fp8 (or auto), got {self.weight_sync_dtype}",
        )
        _require(
            self.moe_aux_loss_coeff is None or self.moe_aux_loss_coeff >= 0,
            "--moe-aux-loss-coeff must be >= 0",
        )
        _require(self.adam_eps > 0, "--adam-eps must be positive")
        _require(self.mtp_loss_scaling_factor >= 0, "--mtp-loss-scaling-factor must be >= 0")
        _require(self.lora_rank >= 0, "--lora-rank must be >= 0 (0 = no LoRA)")
        _require(
            self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
            "--lora-alpha must be > 0, --lora-dropout in [0, 1)",
        )
        _require(
            not (self.lora_rank and (self.int4_qat or self.fp8_format)),
            "--lora-rank trains float32 adapters on a frozen base: --int4-qat / --fp8-format do not apply to it",
        )
        _require(
            not (self.lora_rank and self.optimizer_cpu_offload),
            "--optimizer-cpu-offload has nothing to offload under --lora-rank (only the adapters have optimizer state)",
        )
        _require(self.lr_decay_iters >= 0 and self.lr_warmup_iters >= 0, "--lr-*-iters must be >= 0")
        _require(0 <= self.min_lr <= self.lr, "--min-lr must be in [0, --lr]")
        _require(self.lr_warmup_init >= 0, "--lr-warmup-init must be >= 0")
        _require(
            self.lr_warmup_fraction is None
            or (0 <= self.lr_warmup_fraction < 1 and not self.lr_warmup_iters),
            "--lr-warmup-fraction must be in [0, 1) and cannot go with --lr-warmup-iters (as in Megatron)",
        )

    # ---- device-dependent defaults ("auto"): resolved where the trainer knows its device ------
    def effective_micro_batch_size(self, global_batch_size: int, device_type: str, world: int = 1) -> int:
        """--micro-batch-size, or when 0 (auto): on CPU the whole optimizer step (one pass per
        trainer rank), elsewhere 8 (or the largest of 4, 2, 1 dividing the global batch)."""
        if self.micro_batch_size:
            return self.micro_batch_size
        if device_type == "cpu":
            return max(global_batch_size // max(world, 1), 1)
        return next(m for m in (8, 4, 2, 1) if global_batch_size % m == 0)

    def effective_weight_sync_dtype(self, device_type: str, colocate: bool = False) -> str:
        """--weight-sync-dtype, or when auto: int4 under --int4-qat, fp8 under --fp8-format or from
        a GPU trainer whose bytes cross processes, bf16 from a CPU one or a colocated one (CUDA IPC
        moves no bytes, so FP8 only costs: on the H200 the mesh's train/rollout log-prob gap went
        from 0.0067 to 0.067 with FP8-served weights, bench/mesh_gpu.py)."""
        if self.weight_sync_dtype != "auto":
            return self.weight_sync_dtype
        if self.true_on_policy_mode:
            return "bf16"
        if self.int4_qat:
            return "int4"
        return "fp8" if self.fp8_format or (device_type == "cuda" and not colocate) else "bf16"


@dataclass
class RewardConfig:
    rm_type: str = opt(
        "math",
        "Built-in reward: math (final answer as number or string), exact, deepscaler, dapo, f1 "
        "(slime's), or remote_rm; what each expects of labels: docs/rewards.md.",
    )
    rm_url: str = opt("", "Remote reward endpoint (slime's protocol: POST prompt/response/label JSON).")
    rm_timeout: float = opt(30.0, "Seconds before a remote reward call is abandoned. (Slipstream)")
    rm_max_retries: int = opt(3, "Retries of a failed remote reward call. (Slipstream)")
    reward_max_failures: int = opt(
        3,
        "Times a sample's scoring may fail before the sample goes to the dead-letter stream with the "
        "reason (it is then FAILED in its group and never trained on). (Slipstream)",
    )
    reward_outage_timeout: float = opt(
        300.0,
        "Seconds the reward may stay unavailable (the reward service unreachable, or its --rm-url "
        "endpoint's circuit breaker open after a few unanswered attempts in a row) before the run "
        "fails with one line; meanwhile the coordinator admits no new prompt and fails no sample, "
        "and the console says which endpoint is down and why. (Slipstream)",
    )
    custom_rm_path: str = opt("", "module:function computing the reward, slime's signature (args, sample).")
    reward_key: str = opt(
        "",
        "Entry of a dict reward that is the reward (a --custom-rm-path function's dict, an --rm-url "
        'object reply); empty = "reward".',
    )
    group_rm: bool = opt(
        False,
        "Score a group in one call: the --custom-rm-path function gets the group's list of samples "
        "and returns one reward per sample, in order (built-in rules and --rm-url still score one by one).",
    )
    custom_reward_post_process_path: str = opt(
        "",
        "module:function (args, samples) -> rewards or (raw_rewards, rewards), called once per scored "
        "group with its samples' rewards set; its rewards replace theirs before --advantage-estimator "
        "(which still applies; slime calls it on the whole rollout batch instead of per group).",
    )
    rm_auth_header_file: str = opt(
        "",
        "File holding one HTTP header sent with every --rm-url request, `Name: value` (e.g. "
        "`Authorization: Bearer ...`; a mounted secret). (Slipstream)",
    )

    def __post_init__(self) -> None:
        _require(self.reward_max_failures >= 1, "--reward-max-failures must be at least 1")
        _require(self.reward_outage_timeout > 0, "--reward-outage-timeout must be positive")
        _require(self.rm_type != "remote_rm" or bool(self.rm_url), "--rm-type remote_rm needs --rm-url")
        header = self.rm_auth_header_file
        _require(not header or Path(header).is_file(), f"--rm-auth-header-file {header}: no such file")


@dataclass
class InfraConfig:
    run_dir: str = opt("runs/latest", "Run directory: config, logs, metrics, checkpoints. (Slipstream)")
    redis_url: str = opt("", "External Redis/Valkey; empty = start an embedded server. (Slipstream)")
    run_id: str = opt("", "Name of this run's keys in Redis; empty = the run directory's name. (Slipstream)")
    coordinator_addr: str = opt("", "host:port of the coordinator (set by the launcher). (Slipstream)")
    reward_addr: str = opt("", "host:port of the reward service (set by the launcher). (Slipstream)")
    host: str = opt("127.0.0.1", "Address this service binds to. (Slipstream)")
    port: int = opt(0, "Port this service binds to; 0 = any free port. (Slipstream)")
    ready_file: str = opt("", "File this service writes its bound port into once serving. (Slipstream)")
    server_id: str = opt("", "Name of this rollout server (defaults to host:pid). (Slipstream)")
    rpc_timeout: float = opt(30.0, "Default deadline, in seconds, of unary RPCs. (Slipstream)")
    reconnect_timeout: float = opt(
        120.0,
        "Seconds a service keeps reconnecting, with backoff, to an unreachable coordinator or "
        "Redis before it gives up with an error (a restart takes a few seconds). (Slipstream)",
    )
    max_restarts: int = opt(
        0,
        "Times the launcher restarts each service that dies (same port, same data; the trainer "
        "resumes from its latest checkpoint), as Kubernetes would; 0 = any death stops the run. "
        "(Slipstream)",
    )
    lease_timeout: float = opt(
        30.0,
        "Seconds without a heartbeat after which a rollout server loses its leases and its work is "
        "re-dispatched; a slow server that keeps heartbeating keeps its work. (Slipstream)",
    )
    device: str = opt("auto", "Torch device of this process: auto, cpu, cuda, cuda:N. (Slipstream)")
    torch_threads: int = opt(
        0,
        "Torch CPU threads of this process; 0 = the launcher's choice: every core it may use for a CPU "
        "trainer, 1 for every other service and a GPU trainer (a service started alone: torch's default). "
        "(Slipstream)",
    )
    metrics_port: int = opt(0, "Port of this service's Prometheus /metrics endpoint; 0 = off. (Slipstream)")
    http_port: int = opt(
        0,
        "Port of a rollout server's SGLang-compatible HTTP API (POST /generate, GET /health, "
        "/model_info, POST /abort_request), for slime-style custom generate functions; 0 = off. "
        "(Slipstream; SGLang's own --port)",
    )
    sglang_router_ip: str = opt(
        "",
        "Host of the SGLang-compatible /generate a --custom-generate-function-path function posts to "
        "(args.sglang_router_ip); empty = this rollout server's own --http-port. Set by the launcher.",
    )
    sglang_router_port: int = opt(
        0, "Port of that /generate (args.sglang_router_port); 0 = this server's own --http-port."
    )
    redis_password_file: str = opt(
        "", "File holding the Redis password (a mounted secret), filled into --redis-url. (Slipstream)"
    )
    auth_token_file: str = opt(
        "",
        "File holding the token every RPC must carry (metadata `authorization: Bearer <token>`); "
        "health checks stay open for probes; empty = no authentication. (Slipstream)",
    )
    trainer_token_file: str = opt(
        "",
        "File holding the trainer's own token: the trainer sends it, and the coordinator accepts "
        "PushWeights only with it (PERMISSION_DENIED otherwise). (Slipstream)",
    )
    tls_cert: str = opt("", "PEM certificate of this service (with --tls-key): gRPC over TLS. (Slipstream)")
    tls_key: str = opt("", "PEM private key of --tls-cert. (Slipstream)")
    tls_ca: str = opt(
        "",
        "PEM CA certificates peers must chain to; servers then also require client certificates "
        "(mTLS). Without it, clients verify servers against the system roots. (Slipstream)",
    )

    def __post_init__(self) -> None:
        _require(0 <= self.metrics_port < 65536, "--metrics-port must be in [0, 65535]")
        _require(0 <= self.http_port < 65536, "--http-port must be in [0, 65535]")
        _require(0 <= self.sglang_router_port < 65536, "--sglang-router-port must be in [0, 65535]")
        _require(self.reconnect_timeout > 0, "--reconnect-timeout must be positive")
        _require(self.lease_timeout > 0, "--lease-timeout must be positive")
        _require(self.max_restarts >= 0, "--max-restarts must be >= 0")
        _require(
            not self.redis_password_file or bool(self.redis_url), "--redis-password-file needs --redis-url"
        )
        for flag, path in (
            ("--redis-password-file", self.redis_password_file),
            ("--auth-token-file", self.auth_token_file),
            ("--trainer-token-file", self.trainer_token_file),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-ca", self.tls_ca),
        ):
            _require(not path or Path(path).is_file(), f"{flag} {path}: no such file")
        _require(bool(self.tls_cert) == bool(self.tls_key), "--tls-cert and --tls-key go together")
        _require(not self.tls_ca or bool(self.tls_cert), "--tls-ca (mTLS) needs --tls-cert and --tls-key")

    @property
    def effective_run_id(self) -> str:
        """Name of this run's keys in Redis: --run-id, or the run directory's name."""
        return self.run_id or Path(self.run_dir).resolve().name

    @property
    def redis_connect_url(self) -> str:
        """--redis-url with the password of --redis-password-file in it (the secret stays out of flags)."""
        url, secret = self.redis_url, self.redis_password_file
        if not secret:
            return url
        from urllib.parse import quote, urlsplit, urlunsplit

        password = Path(secret).read_text().strip()
        parts = urlsplit(url)
        host = parts.netloc.rsplit("@", 1)[-1]
        user = quote(parts.username or "", safe="")
        return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


@dataclass
class LoggingConfig:
    """Where the trainer's metrics go besides metrics.jsonl (rank 0 only; same names, slime's where
    slime has the metric: `services/trainer/logging_sinks.py`)."""

    use_tensorboard: bool = opt(False, "Write TensorBoard event files (pip install tensorboard).")
    tensorboard_dir: str = opt("", "TensorBoard log directory; empty = <run-dir>/tensorboard.")
    use_wandb: bool = opt(False, "Log to Weights & Biases (pip install wandb).")
    wandb_project: str = opt("slipstream", "W&B project.")
    wandb_group: str = opt("", "W&B group; empty = none.")
    wandb_run_name: str = opt("", "W&B run name; empty = the run directory's name. (Slipstream)")
    wandb_mode: Literal["online", "offline", "disabled"] = opt(
        "online",
        "W&B mode: online, offline (a local run directory, no network; `wandb sync` later) or disabled.",
    )
    wandb_dir: str = opt("", "Directory W&B writes its files under; empty = <run-dir>.")

    def check_installed(self) -> None:
        """One line naming the missing package. Not in __post_init__: every service reads the
        config, and only the trainer (and `slipstream train`, before the mesh starts) needs them."""
        for flag, wanted, package in (
            ("--use-tensorboard", self.use_tensorboard, "tensorboard"),
            ("--use-wandb", self.use_wandb, "wandb"),
        ):
            _require(
                not wanted or importlib.util.find_spec(package) is not None,
                f"{flag} needs the {package} package: pip install {package} (or pip install 'slipstream[logging]')",
            )


@dataclass
class ClusterConfig:
    """Placement, with slime's names. On a CPU-only machine GPU counts are ignored."""

    actor_num_nodes: int = opt(
        1, "Nodes of the trainer job; only 1 is supported (the trainer runs on one node)."
    )
    actor_num_gpus_per_node: int = opt(
        1, "Trainer processes per node (FSDP2 under torchrun); on CPU, gloo processes."
    )
    rollout_num_gpus: int = opt(
        0, "GPUs for rollout in total; 0 = as many rollout servers as --rollout-num-servers."
    )
    rollout_num_gpus_per_engine: int = opt(
        1,
        "GPUs per rollout engine; only 1 is supported (the native engine runs on one GPU, no tensor parallelism).",
    )
    colocate: bool = opt(False, "Trainer and rollout share the same GPUs.")
    cuda_mps: bool = opt(
        False,
        "Run the GPU services as clients of one CUDA MPS server the launcher starts (nvidia-cuda-mps-control), "
        "so processes sharing a GPU run their kernels side by side instead of taking turns.",
    )

    def __post_init__(self) -> None:
        _require(
            self.actor_num_nodes >= 1 and self.actor_num_gpus_per_node >= 1,
            "--actor-num-* must be at least 1",
        )
        _require(self.rollout_num_gpus_per_engine >= 1, "--rollout-num-gpus-per-engine must be at least 1")
        _require(
            self.rollout_num_gpus % self.rollout_num_gpus_per_engine == 0,
            "--rollout-num-gpus must be a multiple of --rollout-num-gpus-per-engine",
        )
        # Refused rather than accepted and ignored (issue 13): nothing reads more than one.
        _require(
            self.actor_num_nodes == 1,
            f"--actor-num-nodes {self.actor_num_nodes}: not supported; the trainer runs on one node "
            "(--actor-num-gpus-per-node ranks under torchrun)",
        )
        _require(
            self.rollout_num_gpus_per_engine == 1,
            f"--rollout-num-gpus-per-engine {self.rollout_num_gpus_per_engine}: not supported; the native "
            "engine runs on one GPU (one rollout server per GPU of --rollout-num-gpus)",
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    infra: InfraConfig = field(default_factory=InfraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        """Rules across sections; each section checks its own fields in its own __post_init__."""
        t, samples = self.train, self.rollout.samples_per_rollout
        _require(
            self.model.mtp_num_layers >= 1
            or not (self.rollout.speculative_algorithm or self.train.enable_mtp_training),
            "--speculative-algorithm and --enable-mtp-training need a draft: --mtp-num-layers >= 1",
        )
        _require(
            t.global_batch_size == 0 or samples % t.global_batch_size == 0,
            f"--global-batch-size must divide rollout-batch-size x n-samples-per-prompt = {samples}",
        )
        _require(
            t.use_dynamic_batch_size
            or t.micro_batch_size == 0
            or self.effective_global_batch_size % t.micro_batch_size == 0,
            f"--micro-batch-size must divide the global batch size ({self.effective_global_batch_size})",
        )
        _require(
            self.algo.loss_type == "policy_loss"
            or not (t.use_rollout_routing_replay or t.use_routing_replay),
            "--use-rollout-routing-replay / --use-routing-replay replay a rollout's or a proximal pass's "
            "experts: --loss-type sft_loss has neither",
        )
        _require(
            not (t.use_routing_replay and self.algo.use_rollout_logprobs),
            "--use-routing-replay replays the proximal pass, which --use-rollout-logprobs skips",
        )
        _require(
            not (self.rollout.rollout_fp8 and (t.int4_qat or t.weight_sync_dtype == "int4")),
            "--rollout-fp8 and int4 weights (--weight-sync-dtype int4, --int4-qat) exclude each other: "
            "a rollout layer holds one format",
        )
        _require(
            not t.true_on_policy_mode
            or not (self.rollout.rollout_fp8 or self.rollout.kv_cache_dtype != "auto")
            and not self.rollout.speculative_algorithm
            and self.cluster.actor_num_gpus_per_node == 1,
            "--true-on-policy-mode runs its own kernels in one trainer process: it excludes --rollout-fp8, "
            "--kv-cache-dtype fp8_e4m3, --speculative-algorithm and --actor-num-gpus-per-node > 1",
        )
        if t.true_on_policy_mode and self.infra.device != "auto":
            check_true_on_policy_dtypes(self.model, t, self.infra.device)
        _require(
            t.weight_transport != "ipc" or self.cluster.colocate,
            "--weight-transport ipc shares the trainer's GPU buffer with rollout servers on that GPU: "
            "it needs --colocate",
        )

    # ---- derived values ------------------------------------------------------------------
    @property
    def effective_global_batch_size(self) -> int:
        """Samples per optimizer step: --global-batch-size, or one rollout step's samples when 0."""
        return self.train.global_batch_size or self.rollout.samples_per_rollout

    @property
    def save_dir(self) -> Path:
        return Path(self.train.save) if self.train.save else Path(self.infra.run_dir) / "checkpoints"

    # ---- views ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def as_namespace(self) -> argparse.Namespace:
        """The flat namespace slime hooks receive as `args` (`args.rm_type`, `args.lr`, ...)."""
        flat: dict[str, Any] = {}
        for section in self.to_dict().values():
            flat.update(section)
        flat["use_tis"] = self.algo.effective_use_tis  # hooks see the resolved value, never None
        return argparse.Namespace(**flat)

    def save_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")


def redact(url: str) -> str:
    """A Redis URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_true_on_policy_dtypes(model: ModelConfig, train: TrainConfig, device_type: str) -> None:
    """--true-on-policy-mode: the trainer computes in the rollout engine's dtype on `device_type`."""
    trainer = "bfloat16" if train.bf16 or model.dtype == "bfloat16" else "float32"
    rollout = model.rollout_dtype(device_type)
    _require(
        trainer == rollout,
        f"--true-on-policy-mode needs the trainer and the rollout in one dtype; on {device_type} the "
        f"trainer computes in {trainer} and the rollout in {rollout}: "
        + ("add --bf16 (or --dtype float32 for both)" if rollout == "bfloat16" else "drop --bf16"),
    )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---- flags ---------------------------------------------------------------------------------

_SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "algo": AlgoConfig,
    "train": TrainConfig,
    "reward": RewardConfig,
    "infra": InfraConfig,
    "logging": LoggingConfig,
    "cluster": ClusterConfig,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Field name -> (section, field), for every leaf of the tree. Names are unique."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in _SECTION_TYPES.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            f.type = hints[f.name]
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section, f)
    return index


FIELDS = _field_index()


def _scalar_parser(tp: Any):
    """The argparse `type=` and `choices=` for a field's annotation."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), list(choices)
    if origin in (typing.Union, types.UnionType):
        inner = [t for t in typing.get_args(tp) if t is not type(None)]
        return _scalar_parser(inner[0])
    return tp, None


class _Parser(argparse.ArgumentParser):
    """argparse that names the closest real flag when given an unknown one."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            flag = next((u for u in unknown if u.startswith("--")), unknown[0])
            name = flag.split("=", 1)[0]
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            message = f"unknown flag {name}{hint}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def field_default(fld: dataclasses.Field) -> Any:
    return fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()


def _help(fld: dataclasses.Field) -> str:
    """A flag's help with its field default. argparse cannot show it (`%(default)s`): every
    default is SUPPRESSed so that --config and SLIPSTREAM_* values rank below flags only."""
    default = field_default(fld)
    shown = '""' if default == "" else default
    return fld.metadata.get("help", "").replace("%", "%%") + f" (default: {shown})"


def build_parser(prog: str = "slipstream", description: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="JSON or YAML file with the config tree.")
    for section, cls in _SECTION_TYPES.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            _, fld = FIELDS[f.name]
            help_text = _help(fld)
            kind, choices = _scalar_parser(fld.type)
            # slime's spelling of a flag we name for our own engine (--sglang-speculative-*).
            names = [_flag(f.name), *fld.metadata.get("aliases", [])]
            if kind is bool:
                group.add_argument(
                    *names,
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            elif typing.get_origin(kind) is list:
                (elem,) = typing.get_args(kind)
                group.add_argument(
                    *names, dest=f.name, type=elem, nargs="*", default=argparse.SUPPRESS, help=help_text
                )
            else:
                group.add_argument(
                    *names,
                    dest=f.name,
                    type=kind,
                    choices=choices,
                    default=argparse.SUPPRESS,
                    help=help_text,
                    metavar=None if choices else f.name.upper(),
                )
    return parser


def _read_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise ConfigError(f"--config {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: top level must be a mapping")
    return data


def _flatten_file(data: dict[str, Any], path: str) -> dict[str, Any]:
    """Accept either the nested tree (as saved) or flat field names; return flat values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key in _SECTION_TYPES and isinstance(value, dict):
            for k, v in value.items():
                flat[k.replace("-", "_")] = v
        else:
            flat[key] = value
    for key in flat:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, list(FIELDS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key}{hint}")
    return flat


def config_from_values(values: dict[str, Any]) -> Config:
    """Build a Config from flat field values; missing fields keep their defaults."""
    sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTION_TYPES}
    for key, value in values.items():
        section, _ = FIELDS[key]
        sections[section][key] = value
    return Config(**{s: _SECTION_TYPES[s](**kw) for s, kw in sections.items()})


ENV_PREFIX = "SLIPSTREAM_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _env_values(environ: typing.Mapping[str, str], prog: str) -> dict[str, Any]:
    """Config from `SLIPSTREAM_<FIELD>` variables (containers set config this way).

    They rank between the `--config` file and flags. Each value is parsed by the flag's own
    parser, so types and choices are checked the same way; names that are no field (such as
    SLIPSTREAM_LOG_LEVEL) are left alone.
    """
    parser = build_parser(prog)
    parser.exit_on_error = False  # a bad value raises, and is reported under its variable's name
    values: dict[str, Any] = {}
    for key, raw in sorted(environ.items()):
        name = key[len(ENV_PREFIX) :].lower()
        if not key.startswith(ENV_PREFIX) or name not in FIELDS:
            continue
        flag, kind = _flag(name), _scalar_parser(FIELDS[name][1].type)[0]
        if kind is bool:
            if raw.strip().lower() not in _TRUE | _FALSE:
                raise ConfigError(f"{key}={raw!r}: expected true or false")
            argv = [flag if raw.strip().lower() in _TRUE else "--no-" + flag[2:]]
        elif typing.get_origin(kind) is list:
            argv = [flag, *raw.replace(",", " ").split()]
        else:
            argv = [flag, raw]
        try:
            values.update(vars(parser.parse_args(argv)))
        except argparse.ArgumentError as e:
            raise ConfigError(f"{key}={raw!r}: {e.message}") from None
    values.pop("config", None)
    return values


def parse_config(
    argv: list[str] | None = None, prog: str = "slipstream", description: str | None = None
) -> Config:
    """Parse flags (and `--config`) into a validated Config. Errors exit 2 with one line."""
    parser = build_parser(prog, description)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        values: dict[str, Any] = {}
        if ns.config:
            values.update(_flatten_file(_read_file(ns.config), ns.config))
        values.update(_env_values(os.environ, prog))
        values.update({k: v for k, v in vars(ns).items() if k != "config"})
        return config_from_values(values)
    except (ConfigError, TypeError) as e:
        parser.exit(2, f"{prog}: error: {e}\n")


def load_config(path: str | Path) -> Config:
    """Read a config saved with `Config.save_json` (or any file `--config` accepts)."""
    return config_from_values(_flatten_file(_read_file(str(path)), str(path)))
