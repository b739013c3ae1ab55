"""What a caller hands the engine (`Request`) and what it gets back (`Result`).

A request whose `tokens` already hold part of a response (a partial rollout being continued
after an abort) is simply a longer prompt: the engine does not know or care. Every generated
token comes back with its log-prob and the policy version that produced it, because a
trajectory may span weight updates and the trainer corrects for that token by token. A
mixture-of-experts model also reports the experts every position was routed to (R3 replays them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Request:
    rid: str
    tokens: list[int]  # prompt tokens, possibly followed by an earlier partial response
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # per-request seed: same seed + same weights -> same tokens

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError(f"request {self.rid}: empty prompt")
        if self.temperature < 0:
            raise ValueError(f"request {self.rid}: temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"request {self.rid}: top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Result:
    rid: str
    tokens: list[int]  # [num_new] newly generated tokens only
    log_probs: list[float]  # [num_new] log-prob of each sampled token (see sampler.py)
    versions: list[int]  # [num_new] policy version that produced each token
    finish_reason: FinishReason  # "stop": EOS/stop token (included in tokens); "length"; "abort"
    # MoE only: the top-k expert ids of every position the model was fed (the request's tokens,
    # then the new ones, all but the last), [len(tokens) + num_new - 1, moe_layers * top_k],
    # MoE layers in order, uint8 (<= 256 experts) or int16, on the CPU. slime's layout.
    routed_experts: torch.Tensor | None = None
