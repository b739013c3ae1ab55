"""Proto <-> Python conversion, in exactly one place.

`Sample` (slipstream.types) is what code works with; `types_pb2.Sample` is what travels.
Everything that crosses a process boundary goes through these two functions, so a field
added to one side and forgotten on the other fails `tests/test_convert.py`.
"""

from __future__ import annotations

import json

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
        rollout_routed_experts=[types_pb2.RoutedExperts(experts=e) for e in (s.rollout_routed_experts or [])],
        metadata_json=json.dumps(metadata) if metadata else "",
    )


def sample_from_proto(p: types_pb2.Sample) -> Sample:
    metadata = json.loads(p.metadata_json) if p.metadata_json else {}
    reward: float | dict | None = p.reward
    if "_reward_dict" in metadata:
        reward = metadata.pop("_reward_dict")
    prompt: str | list = p.prompt
    if p.prompt.startswith("[{"):
        try:
            prompt = json.loads(p.prompt)
        except json.JSONDecodeError:
            prompt = p.prompt
    n = p.response_length
    return Sample(
        uid=p.uid,
        group_index=p.group_index if p.group_index >= 0 else None,
        index=p.index if p.index >= 0 else None,
        prompt=prompt,
        tokens=list(p.tokens),
        response_length=n,
        response=p.response,
        label=p.label or None,
        reward=reward,
        loss_mask=list(p.loss_mask) if len(p.loss_mask) == n and n else None,
        rollout_log_probs=list(p.rollout_log_probs) if len(p.rollout_log_probs) == n and n else None,
        policy_versions=list(p.policy_versions) if len(p.policy_versions) == n and n else None,
        status=_STATUS_FROM_PB[p.status],
        rollout_routed_experts=[list(e.experts) for e in p.rollout_routed_experts] or None,
        metadata=metadata,
    )
