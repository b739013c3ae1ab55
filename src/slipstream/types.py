"""The `Sample`: one trajectory, as slime/miles define it, plus what asynchrony needs.

Field names and meanings follow slime's `slime.utils.types.Sample` so hooks written for
slime (custom rewards, filters) work on ours. Slipstream adds `uid` (a run-unique id used
for exactly-once accounting) and `policy_versions` (the weight version that produced each
response token; a trajectory that spans weight updates has several).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(Enum):
    PENDING = "pending"
    COMPLETED = "completed"  # stopped on EOS or a stop token
    TRUNCATED = "truncated"  # hit the response-length budget
    ABORTED = "aborted"  # interrupted; a partial trajectory that may be continued
    FAILED = "failed"  # the reward could not be computed, or the sample is unusable


@dataclass
class Sample:
    group_index: int | None = None
    index: int | None = None
    prompt: str | list[dict[str, str]] = ""
    tokens: list[int] = field(default_factory=list)  # [prompt_len + response_length]
    response: str = ""
    response_length: int = 0
    label: str | None = None
    reward: float | dict[str, Any] | None = None
    loss_mask: list[int] | None = None  # [response_length], 1 = trained
    rollout_log_probs: list[float] | None = None  # [response_length], behaviour policy
    rollout_routed_experts: list[list[int]] | None = None  # [len(tokens) - 1][moe_layers * top_k]
    status: Status = Status.PENDING
    metadata: dict[str, Any] = field(default_factory=dict)
    # Slipstream additions
    uid: str = ""
    policy_versions: list[int] | None = None  # [response_length]

    Status = Status  # slime code spells it Sample.Status.COMPLETED

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def prompt_tokens(self) -> list[int]:
        return self.tokens[: self.prompt_length]

    @property
    def response_tokens(self) -> list[int]:
        return self.tokens[self.prompt_length :]

    @property
    def is_trainable(self) -> bool:
        """Whether the loss may see this sample at all: scored, and with a response."""
        return self.status is not Status.FAILED and self.response_length > 0

    @property
    def oldest_version(self) -> int | None:
        """The policy version of the sample's oldest response token (None: versions unknown)."""
        return min(self.policy_versions) if self.policy_versions else None

    def get_reward_value(self, args: Any = None) -> float:
        """The scalar reward (slime's `reward_key` picks a component of a dict reward)."""
        if isinstance(self.reward, dict):
            key = getattr(args, "reward_key", None) or "reward"
            return float(self.reward[key])
        return float(self.reward or 0.0)
