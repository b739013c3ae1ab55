"""Proto <-> Python conversion, in exactly one place.

`Sample` (slipstream.types) is what code works with; `types_pb2.Sample` is what travels.
Everything that crosses a process boundary goes through these two functions, so a field
added to one side and forgotten on the other fails `tests/test_convert.py`.

What arrives may be hostile or corrupt (a buggy peer, a damaged Redis entry): `sample_from_proto`
raises `SampleError` (a ValueError, one line) for anything it cannot turn into a `Sample`, and
`check_sample` is the boundary check services apply before trusting a sample's numbers: token
ids inside the vocabulary, lengths consistent and bounded, floats finite.

Routed experts (MoE) travel packed (`PackedRoutedExperts`: one byte an id up to 256 experts, two
up to 32768) and become slime's `list[list[int]]` [positions][layers * top_k] here; the older
repeated `rollout_routed_experts` field is still read, never written.
"""

from __future__ import annotations

import json
import math
import sys
from array import array

from slipstream.proto import types_pb2
from slipstream.types import Sample, Status

_STATUS_TO_PB = {
    Status.PENDING: types_pb2.SAMPLE_STATUS_PENDING,
    Status.COMPLETED: types_pb2.SAMPLE_STATUS_COMPLETED,
    Status.TRUNCATED: types_pb2.SAMPLE_STATUS_TRUNCATED,
    Status.ABORTED: types_pb2.SAMPLE_STATUS_ABORTED,
    Status.FAILED: types_pb2.SAMPLE_STATUS_FAILED,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}
_ITEMSIZE = {types_pb2.EXPERT_ID_DTYPE_UINT8: 1, types_pb2.EXPERT_ID_DTYPE_INT16: 2}


class SampleError(ValueError):
    """A sample off the wire that is malformed or out of bounds; the message names the field."""


def packed_routed_experts(ids: bytes, itemsize: int, experts_per_token: int) -> types_pb2.PackedRoutedExperts:
    """The wire form of routed expert ids already packed row-major (itemsize 1: uint8, 2: int16 LE)."""
    dtype = {1: types_pb2.EXPERT_ID_DTYPE_UINT8, 2: types_pb2.EXPERT_ID_DTYPE_INT16}[itemsize]
    return types_pb2.PackedRoutedExperts(ids=ids, dtype=dtype, experts_per_token=experts_per_token)


def routed_experts_rows(p: types_pb2.PackedRoutedExperts) -> list[list[int]]:
    """[positions][experts_per_token] ids of a packed message (checked by `check_sample`)."""
    if p.dtype == types_pb2.EXPERT_ID_DTYPE_UINT8:
        flat = list(p.ids)
    else:
        values = array("h", p.ids)
        if sys.byteorder == "big":
            values.byteswap()
        flat = values.tolist()
    width = p.experts_per_token
    return [flat[i : i + width] for i in range(0, len(flat), width)]


def _pack_rows(rows: list[list[int]]) -> types_pb2.PackedRoutedExperts:
    width = len(rows[0])
    flat = [e for row in rows for e in row]
    if any(len(row) != width for row in rows) or not all(0 <= e < 1 << 15 for e in flat):
        raise SampleError("rollout_routed_experts: rows of unequal width or ids outside [0, 32768)")
    if max(flat, default=0) < 256:
        return packed_routed_experts(bytes(flat), 1, width)
    values = array("h", flat)
    if sys.byteorder == "big":
        values.byteswap()
    return packed_routed_experts(values.tobytes(), 2, width)


def num_routed_positions(p: types_pb2.Sample) -> int:
    """Positions in `p.routed_experts` (0 when absent)."""
    r = p.routed_experts
    itemsize = _ITEMSIZE.get(r.dtype, 1)
    return len(r.ids) // (itemsize * r.experts_per_token) if r.experts_per_token > 0 else 0


def check_sample(p: types_pb2.Sample, vocab_size: int = 0, max_tokens: int = 0) -> None:
    """Raise `SampleError` unless `p`'s numbers can be trusted (vocab_size/max_tokens 0 = unchecked).

    Every sample crossing the coordinator and the buffer comes through here (1,024 a step in the
    demo), so each rule is one C-level pass (min, max, sum) over its field."""
    n, total = p.response_length, len(p.tokens)
    if p.status not in _STATUS_FROM_PB:
        raise SampleError(f"{_where(p)}: unknown status {p.status}")
    if not 0 <= n <= total:
        raise SampleError(f"{_where(p)}: response_length {n} outside [0, {total} tokens]")
    if max_tokens and total > max_tokens:
        raise SampleError(f"{_where(p)}: {total} tokens, more than the {max_tokens} allowed")
    if vocab_size and total and not (0 <= min(tokens := p.tokens[:]) and max(tokens) < vocab_size):
        bad = next(t for t in tokens if not 0 <= t < vocab_size)
        raise SampleError(f"{_where(p)}: token id {bad} outside the vocabulary [0, {vocab_size})")
    for name in ("loss_mask", "rollout_log_probs", "policy_versions"):
        got = len(getattr(p, name))
        if got not in (0, n):
            raise SampleError(f"{_where(p)}: {got} {name} for a {n}-token response")
    if not math.isfinite(p.reward):
        raise SampleError(f"{_where(p)}: reward is {p.reward}")
    lp = p.rollout_log_probs[:]  # a list: the passes below run at C speed (slicing is the cheap copy)
    # A NaN or an infinity makes the sum non-finite; only then (or on an overflow) each is looked at.
    if lp and not (max(lp) <= 0.0 and (math.isfinite(sum(lp)) or all(map(math.isfinite, lp)))):
        raise SampleError(f"{_where(p)}: rollout_log_probs must be finite and <= 0")
    if p.policy_versions and min(p.policy_versions) < 0:
        raise SampleError(f"{_where(p)}: negative policy version")
    if p.HasField("routed_experts"):
        r = p.routed_experts
        itemsize = _ITEMSIZE.get(r.dtype)
        if itemsize is None or r.experts_per_token <= 0 or len(r.ids) % (itemsize * r.experts_per_token):
            raise SampleError(
                f"{_where(p)}: routed_experts of {len(r.ids)} bytes is not whole rows of "
                f"{r.experts_per_token} ids of dtype {r.dtype}"
            )
        if num_routed_positions(p) > max(total - 1, 0):
            raise SampleError(f"{_where(p)}: routed experts for more positions than its {total} tokens feed")
        if itemsize == 2 and any(e < 0 for row in routed_experts_rows(r) for e in row):
            raise SampleError(f"{_where(p)}: negative expert id")


def _where(p: types_pb2.Sample) -> str:
    return f"sample {p.uid[:80]!r}"


def sample_to_proto(s: Sample) -> types_pb2.Sample:
    reward = s.reward
    metadata = dict(s.metadata)
    if isinstance(reward, dict):
        # A dict reward travels in metadata; the scalar field holds its "reward" entry if any.
        metadata["_reward_dict"] = reward
        reward = float(reward.get("reward", 0.0))
    prompt = s.prompt if isinstance(s.prompt, str) else json.dumps(s.prompt)
    return types_pb2.Sample(
        uid=s.uid,
        group_index=s.group_index if s.group_index is not None else -1,
        index=s.index if s.index is not None else -1,
        prompt=prompt,
        tokens=s.tokens,
        response_length=s.response_length,
        response=s.response,
        label=s.label or "",
        reward=float(reward) if reward is not None else 0.0,
        loss_mask=s.loss_mask or [],
        rollout_log_probs=s.rollout_log_probs or [],
        policy_versions=s.policy_versions or [],
        status=_STATUS_TO_PB[s.status],
        routed_experts=_pack_rows(s.rollout_routed_experts) if s.rollout_routed_experts else None,
        metadata_json=json.dumps(metadata) if metadata else "",
    )


def sample_metadata(p: types_pb2.Sample) -> tuple[dict, float | dict]:
    """(metadata, reward) of a proto: a dict reward travels in metadata (`sample_to_proto`);
    `SampleError` when they cannot be read. What `sample_from_proto` checks beyond `check_sample`."""
    try:
        metadata = json.loads(p.metadata_json) if p.metadata_json else {}
    except (json.JSONDecodeError, RecursionError) as e:
        raise SampleError(f"{_where(p)}: metadata_json is not JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise SampleError(f"{_where(p)}: metadata_json must be an object")
    reward: float | dict = p.reward
    if "_reward_dict" in metadata:
        reward = metadata.pop("_reward_dict")
        if not isinstance(reward, dict):
            raise SampleError(f"{_where(p)}: a reward dict must be an object")
    return metadata, reward


def sample_from_proto(p: types_pb2.Sample) -> Sample:
    """The Sample of a proto; `SampleError` if it cannot be one (bad status, metadata, lengths)."""
    if p.status not in _STATUS_FROM_PB:
        raise SampleError(f"{_where(p)}: unknown status {p.status}")
    if not 0 <= p.response_length <= len(p.tokens):
        raise SampleError(f"{_where(p)}: response_length {p.response_length} > {len(p.tokens)} tokens")
    metadata, reward = sample_metadata(p)
    prompt: str | list = p.prompt
    if p.prompt.startswith("[{"):
        try:
            prompt = json.loads(p.prompt)
        except (json.JSONDecodeError, RecursionError):
            prompt = p.prompt
    n = p.response_length
    return Sample(
        uid=p.uid,
        group_index=p.group_index if p.group_index >= 0 else None,
        index=p.index if p.index >= 0 else None,
        prompt=prompt,
        tokens=p.tokens[:],  # a slice of a repeated field is a list, made twice as fast as list()
        response_length=n,
        response=p.response,
        label=p.label or None,
        reward=reward,
        loss_mask=p.loss_mask[:] if len(p.loss_mask) == n and n else None,
        rollout_log_probs=p.rollout_log_probs[:] if len(p.rollout_log_probs) == n and n else None,
        policy_versions=p.policy_versions[:] if len(p.policy_versions) == n and n else None,
        status=_STATUS_FROM_PB[p.status],
        rollout_routed_experts=(
            routed_experts_rows(p.routed_experts)
            if p.HasField("routed_experts")
            else [list(e.experts) for e in p.rollout_routed_experts] or None
        ),
        metadata=metadata,
    )
