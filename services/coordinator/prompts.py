"""From the prompt file to the work a rollout server is given.

The prompts are loaded and tokenized once, at start (`tokenize_prompts` refuses a prompt longer
than `--rollout-max-prompt-len` before anything listens). A group is one prompt, drawn by a
`PromptCursor` whose position is the journal's `cursor`, times `n_samples_per_prompt` sample
templates (`Prompts.templates`). Each sample leased to a stream goes out as a `WorkItem`
(`work_item`): its sampling parameters, a per-sample seed, and the oldest policy version it may
be generated on.

Pure functions of their inputs: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from typing import Any

from slipstream.config import DataConfig, RolloutConfig
from slipstream.data import DataError, PromptCursor, PromptRecord, encode_prompt
from slipstream.proto import coordinator_pb2, types_pb2
from slipstream.rpc.convert import sample_to_proto
from slipstream.services.coordinator.groups import Assignment
from slipstream.types import Sample


def tokenize_prompts(
    tokenizer: Any, records: list[PromptRecord], data: DataConfig, max_prompt_len: int
) -> list[list[int]]:
    """Every prompt's tokens, checked against `--rollout-max-prompt-len` before serving."""
    out = []
    for i, record in enumerate(records, 1):
        try:
            tokens = encode_prompt(tokenizer, record.prompt, data.apply_chat_template)
        except DataError as e:
            raise DataError(f"{data.prompt_data}: record {i}: {e}") from None
        if len(tokens) > max_prompt_len:
            raise DataError(
                f"{data.prompt_data}: record {i}: prompt is {len(tokens)} tokens, "
                f"longer than --rollout-max-prompt-len {max_prompt_len}"
            )
        if not tokens:
            raise DataError(f"{data.prompt_data}: record {i}: prompt encodes to no tokens")
        out.append(tokens)
    return out


def sample_seed(base_seed: int, uid: str) -> int:
    """A per-sample sampling seed: reproducible for a run, distinct across samples (int63)."""
    digest = hashlib.sha256(f"{base_seed}:{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Prompts:
    """The run's prompts and their tokens; each pipeline walks them with a cursor of its own."""

    def __init__(self, records: list[PromptRecord], tokens: list[list[int]], shuffle: bool, seed: int):
        self.records = records
        self.shuffle = shuffle
        self.seed = seed
        self._tokens = {id(r): t for r, t in zip(records, tokens, strict=True)}

    def cursor(self, position: int) -> PromptCursor:
        return PromptCursor(self.records, shuffle=self.shuffle, seed=self.seed, position=position)

    def templates(self, group_id: str, index: int, record: PromptRecord, n: int) -> list[types_pb2.Sample]:
        """The `n` samples of group `group_id` (prompt number `index`), not yet generated."""
        template = sample_to_proto(
            Sample(
                group_index=index,
                prompt=record.prompt,
                tokens=self._tokens[id(record)],
                label=record.label,
                metadata=record.metadata,
            )
        )  # converted once, copied n times (the prompt's tokens, text and metadata JSON)
        samples = []
        for i in range(n):
            sample = types_pb2.Sample()
            sample.CopyFrom(template)
            sample.uid, sample.index = f"{group_id}/{i}", i
            samples.append(sample)
        return samples


def sampling_params(rollout: RolloutConfig) -> types_pb2.SamplingParams:
    """What every work item's sampling starts from (built once: a copy is one call per item)."""
    return types_pb2.SamplingParams(
        temperature=rollout.rollout_temperature,
        top_p=rollout.rollout_top_p,
        top_k=max(rollout.rollout_top_k, 0),
        max_new_tokens=rollout.rollout_max_response_len,
        stop_token_ids=rollout.rollout_stop_token_ids,
    )


def work_item(
    a: Assignment, sampling: types_pb2.SamplingParams, seed: int, version: int
) -> coordinator_pb2.RolloutCommand:
    """The command that hands sample `a` to its stream (`sampling` from `sampling_params`),
    `version` being the newest one."""
    cmd = coordinator_pb2.RolloutCommand()
    work = cmd.work  # filled in place: each sub-message given whole would be copied into it again
    work.work_id, work.lease_epoch = a.work_id, a.epoch
    work.sample.CopyFrom(a.sample)
    work.sampling.CopyFrom(sampling)
    # A continued (partial) sample only gets what is left of the response budget.
    work.sampling.max_new_tokens -= a.sample.response_length
    work.sampling.seed = sample_seed(seed, a.work_id)
    # Fresh work is generated on the version it was admitted under (or newer); a partial
    # being continued goes on under the newest weights.
    work.min_policy_version = version if a.continued else a.group_version
    return cmd
