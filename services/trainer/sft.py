"""Supervised fine-tuning (`--loss-type sft_loss`): the trainer alone, on a JSONL of examples.

    examples = encode_example(record) for each record of --prompt-data
    for step in start + 1 .. num_steps:
        samples = the next --rollout-batch-size examples   # epoch after epoch (--rollout-shuffle
                                                          # reshuffles each), resumable by position
        stats   = actor.train_sft(samples)                # the RL trainer's micro-batches, packing,
                                                          # precision, FSDP, lr schedule, skip rule
        metrics.jsonl row (+ TensorBoard/W&B), checkpointer.maybe_save(step)

No rollout server, reward service, coordinator or buffer: `slipstream train --loss-type sft_loss`
runs this in one process (`torchrun -m slipstream.services.trainer --loss-type sft_loss ...` for
FSDP ranks: every rank reads the same examples in the same order and trains its micro-batches).

A record is a prompt/response pair (--input-key, --label-key) or a chat conversation
(--input-key holding `messages`, with --apply-chat-template). Only the response, or every
assistant turn, is trained: a Sample's response starts at the first trained token and its
loss mask zeroes the user turns between assistant turns (slime's multi-turn loss masks). An
assistant turn's tokens are found by rendering the conversation up to it with the generation
prompt and up to its end: what lies between is the turn (its end-of-turn token included, so the
model learns to stop), which needs a template that renders a conversation as a prefix of its
continuation; one that does not (e.g. one that drops earlier turns' reasoning) is refused.

A step trains --rollout-batch-size examples in rollout-batch-size / global-batch-size optimizer
steps (--global-batch-size 0: one); --n-samples-per-prompt does not apply. --num-epoch, when
set, gives the number of steps; else --num-rollout does. A checkpoint needs nothing but the step
to resume: the data order is a function of the seed and the position.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from slipstream.config import Config, ConfigError
from slipstream.data import DataError, PromptCursor, PromptRecord, encode_prompt, load_prompts
from slipstream.types import Sample, Status

from .actor import Actor
from .checkpoint import load_trainer_state, resolve_checkpoint
from .checkpointer import Checkpointer
from .logging_sinks import open_sinks
from .metrics import MetricsLog
from .state import NonFiniteStop, TrainerState

log = logging.getLogger("slipstream.trainer")


def _template(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # newer transformers: a BatchEncoding


def chat_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(token ids of the conversation, loss mask over them: 1 on every assistant turn's tokens)."""
    full = _template(tokenizer, messages, False)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:
            raise DataError("an assistant turn needs a message before it to be trained on")
        before = _template(tokenizer, messages[:i], True)
        upto = _template(tokenizer, messages[: i + 1], False)
        if upto[: len(before)] != before or full[: len(upto)] != upto:
            raise DataError(
                "the chat template does not render a conversation as a prefix of its continuation: "
                "the assistant turns' tokens cannot be told apart"
            )
        mask[len(before) : len(upto)] = [1] * (len(upto) - len(before))
    return full, mask


def encode_example(tokenizer: Any, record: PromptRecord, apply_chat_template: bool) -> Sample:
    """One record -> a Sample whose response is the trained part (prompt: everything before it)."""
    try:
        if apply_chat_template:
            messages = (
                [{"role": "user", "content": record.prompt}]
                if isinstance(record.prompt, str)
                else record.prompt
            )
            if record.label:
                messages = [*messages, {"role": "assistant", "content": record.label}]
            tokens, mask = chat_tokens(tokenizer, messages)
            if 1 not in mask:
                raise DataError("no assistant turn and no response (--label-key): nothing to train")
        else:
            if not record.label:
                raise DataError("no response (--label-key); chat messages need --apply-chat-template")
            prompt = encode_prompt(tokenizer, record.prompt, apply_chat_template=False)
            response = list(tokenizer(record.label, add_special_tokens=False)["input_ids"])
            response.append(tokenizer.eos_token_id)  # so the model learns to stop
            tokens, mask = prompt + response, [0] * len(prompt) + [1] * len(response)
    except DataError as e:
        raise DataError(f"{record.where}: {e}") from None
    start = mask.index(1)
    if start == 0:
        raise DataError(f"{record.where}: an empty prompt: the first response token has nothing to follow")
    return Sample(
        prompt=record.prompt,
        tokens=tokens,
        response_length=len(tokens) - start,
        loss_mask=mask[start:],
        status=Status.COMPLETED,
    )


@dataclass(frozen=True)
class SftPlan:
    """How many examples a step trains, in how many optimizer steps, for how many steps."""

    per_step: int  # examples per step (--rollout-batch-size)
    global_batch_size: int  # examples per optimizer step
    num_steps: int
    num_examples: int

    @classmethod
    def from_config(cls, cfg: Config, num_examples: int) -> SftPlan:
        per_step, t = cfg.rollout.rollout_batch_size, cfg.train
        gbs = t.global_batch_size or per_step
        if per_step % gbs:
            raise ConfigError(f"--global-batch-size {gbs} must divide --rollout-batch-size {per_step}")
        if not t.use_dynamic_batch_size and t.micro_batch_size and gbs % t.micro_batch_size:
            raise ConfigError(
                f"--micro-batch-size {t.micro_batch_size} must divide the global batch size {gbs}"
            )
        epochs = cfg.data.num_epoch
        num_steps = epochs * num_examples // per_step if epochs else cfg.rollout.num_rollout
        if num_steps < 1:
            raise ConfigError(f"--num-epoch {epochs}: fewer than --rollout-batch-size {per_step} examples")
        return cls(per_step, gbs, num_steps, num_examples)

    @property
    def num_optimizer_steps(self) -> int:
        return self.num_steps * self.per_step // self.global_batch_size


def sft_row(state: TrainerState, plan: SftPlan, samples: list[Sample], stats: Any, seconds: float) -> dict:
    """The metrics.jsonl row of an SFT step (the names the RL rows use for the same things)."""
    return dict(
        step=state.step,
        epoch=state.step * plan.per_step / plan.num_examples,
        loss=stats.loss,
        grad_norm=stats.grad_norm,
        **stats.metrics,  # lr
        num_samples=len(samples),
        response_len_mean=sum(s.response_length for s in samples) / len(samples),
        num_trained_tokens=stats.num_tokens,
        tokens_per_s=stats.num_tokens / max(seconds, 1e-9),
        compute_s=seconds,
        num_optimizer_steps=stats.num_optimizer_steps,
        num_skipped_steps=stats.num_skipped_steps,
        num_nonfinite_in_a_row=state.nonfinite_in_a_row,
    )


def load_examples(cfg: Config) -> list[Sample]:
    from transformers import AutoTokenizer

    d = cfg.data
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_checkpoint)
    records = load_prompts(d.prompt_data, d.input_key, d.label_key, d.metadata_key)
    return [encode_example(tokenizer, r, d.apply_chat_template) for r in records]


def train_sft(
    cfg: Config, state: TrainerState | None = None, after_step: Callable[[int, Actor], bool] | None = None
) -> TrainerState:
    """The whole SFT run, on every rank; returns the final state. `after_step(step, actor)`, for a
    caller in the same process (the demo's warm start), may end the run early by returning True:
    the run then stops as on a stop request, with a checkpoint of that step."""
    state = state or TrainerState()
    cfg.logging.check_installed()
    torch.manual_seed(cfg.train.seed)
    examples = load_examples(cfg)
    plan = SftPlan.from_config(cfg, len(examples))
    ckpt = resolve_checkpoint(cfg.train.load) if cfg.train.load else None
    actor = Actor(
        cfg.model, cfg.train, cfg.algo,
        global_batch_size=plan.global_batch_size,
        temperature=1.0,
        max_response_len=cfg.rollout.rollout_max_response_len,
        device=cfg.infra.device,
        model_path=str(ckpt) if ckpt else None,
        num_optimizer_steps=plan.num_optimizer_steps,
    )  # fmt: skip
    if ckpt:
        state.restore(
            load_trainer_state(ckpt, actor.model, actor.optimizer, actor.scheduler, actor.draft_parts)
        )
        log.info("resumed from %s at step %d", ckpt, state.step)
    cursor = PromptCursor(
        examples, cfg.data.rollout_shuffle, cfg.train.seed, position=state.step * plan.per_step
    )
    checkpointer = Checkpointer(
        cfg.save_dir, cfg.train.save_interval, actor.model, actor.optimizer, actor.par,
        saved_at=state.step if ckpt else -1, tokenizer_dir=cfg.model.hf_checkpoint,
        describe=lambda: {**state.checkpoint_meta(), "loss_type": "sft_loss"}, scheduler=actor.scheduler,
        draft=actor.draft_parts,
    )  # fmt: skip
    main = actor.par.is_main
    metrics = MetricsLog(cfg.infra.run_dir) if main else None
    sinks = open_sinks(cfg) if main else None
    limit = cfg.train.max_nonfinite_steps
    try:
        for step in range(state.step + 1, plan.num_steps + 1):
            if actor.par.share_flag(state.stop.is_set() if main else None):
                break
            t0 = time.perf_counter()
            samples = [cursor.next()[1] for _ in range(plan.per_step)]
            stats = actor.train_sft(samples)
            state.count_optimizer_steps(stats.num_optimizer_steps, stats.num_skipped_steps)
            state.step = step
            if main:
                metrics.write(**sft_row(state, plan, samples, stats, time.perf_counter() - t0))
                sinks.log(metrics.rows[-1])
            if state.nonfinite_in_a_row >= limit:
                break
            checkpointer.maybe_save(step)
            if after_step is not None and after_step(step, actor):
                break
        checkpointer.maybe_save(state.step, last=True)
    finally:
        if sinks is not None:
            sinks.close()
    if state.nonfinite_in_a_row >= limit:
        raise NonFiniteStop(
            f"{state.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
            f"(--max-nonfinite-steps {limit}); stopped at step {state.step}"
        )
    state.finished = state.step >= plan.num_steps
    return state


def main(cfg: Config) -> int:
    """`slipstream train --loss-type sft_loss`: SIGTERM or Ctrl-C stops after the step in progress,
    with a checkpoint of it."""
    from slipstream.log import setup_logging

    setup_logging("trainer")
    if cfg.infra.torch_threads:
        torch.set_num_threads(cfg.infra.torch_threads)
    state = TrainerState()

    def stop(signum, frame):  # noqa: ARG001
        log.info("stop requested; finishing the step in progress")
        state.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        cfg.save_json(f"{cfg.infra.run_dir}/config.json")
        train_sft(cfg, state)
    except (DataError, ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"slipstream train: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0 if state.finished or state.stop.is_set() else 1
