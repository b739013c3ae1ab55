"""Sample assembly: a wire `Sample` into an engine `Request`, and the engine's `Result` back into it.

A sample may arrive with part of its response already generated (a partial rollout continued
after an abort): its `tokens` are then prompt + earlier response, `response_length` says where
the response starts, and the engine simply sees a longer prompt. The result is appended, so the
sample keeps its earlier tokens, log-probs and per-token policy versions, and every response
token is trained on (`loss_mask` 1). How the engine finished becomes the sample's status: "stop"
COMPLETED, "length" TRUNCATED, "abort" ABORTED (the coordinator continues it later).

A mixture-of-experts engine also reports the experts of every position it fed (prompt included,
all but the last token); they go on the wire packed (`convert.packed_routed_experts`). A continued
sample keeps the positions its earlier segments recorded and takes the rest from this result,
as its log-probs and versions append.

Pure functions: no engine, no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from slipstream.proto import types_pb2
from slipstream.rpc.convert import num_routed_positions, packed_routed_experts
from slipstream.services.rollout.engine.request import Request, Result

if TYPE_CHECKING:
    from slipstream.models import Qwen3Config

_STATUS = {
    "stop": types_pb2.SAMPLE_STATUS_COMPLETED,
    "length": types_pb2.SAMPLE_STATUS_TRUNCATED,
    "abort": types_pb2.SAMPLE_STATUS_ABORTED,
}


class Tokenizer(Protocol):
    """What sample assembly needs of a (Hugging Face) tokenizer."""

    eos_token_id: int | None

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def make_request(
    rid: str, sample: types_pb2.Sample, sampling: types_pb2.SamplingParams, default_max_new_tokens: int
) -> Request:
    """The engine request for a sample (its tokens may already hold a partial response).

    Unset wire fields (0) mean the defaults: `default_max_new_tokens`, no top-p, no top-k, no
    seed. `ValueError` for parameters the engine cannot use.
    """
    return Request(
        rid=rid,
        tokens=list(sample.tokens),
        max_new_tokens=sampling.max_new_tokens or default_max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p or 1.0,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        stop_token_ids=list(sampling.stop_token_ids),
        seed=sampling.seed or None,
    )


def finish_sample(sample: types_pb2.Sample, result: Result, tokenizer: Tokenizer) -> types_pb2.Sample:
    """The sample with the engine's result appended (a continued sample keeps its earlier part)."""
    out = types_pb2.Sample()
    out.CopyFrom(sample)
    out.tokens.extend(result.tokens)
    out.response_length = sample.response_length + len(result.tokens)
    out.rollout_log_probs.extend(result.log_probs)
    out.policy_versions.extend(result.versions)
    if result.routed_experts is not None:
        out.routed_experts.CopyFrom(_appended_routing(sample, result))
    del out.loss_mask[:]
    out.loss_mask.extend([1] * out.response_length)
    response = out.tokens[len(out.tokens) - out.response_length :] if out.response_length else []
    out.response = tokenizer.decode(list(response), skip_special_tokens=True)
    out.status = _STATUS[result.finish_reason]
    return out


def _appended_routing(sample: types_pb2.Sample, result: Result) -> types_pb2.PackedRoutedExperts:
    """The earlier segments' routed positions, then this result's for the positions after them."""
    ids = result.routed_experts  # [positions fed, experts_per_token], uint8 or int16
    itemsize, width = ids.element_size(), ids.shape[1]
    new = ids.numpy().astype("<i2" if itemsize == 2 else "u1").tobytes()
    out = packed_routed_experts(new, itemsize, width)
    old, kept = sample.routed_experts, num_routed_positions(sample)
    if kept and (old.dtype, old.experts_per_token) == (out.dtype, width) and kept <= ids.shape[0]:
        out.ids = old.ids + new[kept * width * itemsize :]
    return out  # with nothing earlier (or another model's layout), all of it from this result


def with_status(sample: types_pb2.Sample, status: int) -> types_pb2.Sample:
    """A copy of the sample, unchanged but for its status (work answered without generating)."""
    out = types_pb2.Sample()
    out.CopyFrom(sample)
    out.status = status
    return out


def eos_token_ids(model_config: Qwen3Config, tokenizer: Tokenizer) -> list[int]:
    """EOS ids from config.json and the tokenizer, both honoured (they differ in some releases)."""
    ids = list(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"{model_config}: no EOS token in config.json or the tokenizer")
    return ids
