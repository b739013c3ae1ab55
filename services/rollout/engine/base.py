"""What the rollout server may call on an engine: the `Engine` protocol.

The server never reaches into an engine: it adds requests, steps the engine (from the engine
thread, `worker.py`), aborts requests, swaps weights in and reads the version it serves and
how busy it is. That is nano-vllm's small surface, and it is all a new engine has to offer; an
engine that runs its own scheduler (an SGLang adapter, say) implements `step()` as "hand back
what finished since the last call".

Contract, whatever the engine:
- `step()` and every other method run on one thread (the engine thread), never concurrently.
- Every request ends in exactly one `Result`: from `step()` once finished ("stop"/"length"),
  or from `abort`/`abort_all` with the tokens generated so far ("abort"). A result may come back
  a step or two after the request's last token (the native engine on a GPU reads finishes one
  step late), and `abort`/`abort_all` then return the finished result itself. A request the
  engine refuses raises `ValueError` from `add_request` and leaves the engine as it was.
- Each generated token carries the policy version that produced it; `load_weights` swaps in a
  version between two steps (a refused update raises `ValueError` and changes nothing), and
  every token sampled after it carries the new version.

Declaring it needs no torch: tensors are what `load_weights` receives, nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from slipstream.services.rollout.engine.request import Request, Result

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Engine(Protocol):
    name: str  # what `Rollout.GetInfo` reports: "native", ...
    policy_version: int  # the weights version it serves now
    max_batch_size: int  # capacity: the most sequences it decodes at once

    @property
    def num_running(self) -> int:
        """Sequences holding a slot now (admitted; on a GPU, one step past a finish not yet read)."""
        ...

    def has_work(self) -> bool:
        """Whether `step()` has anything to do (requests waiting or running)."""
        ...

    def warm_up(self) -> int:
        """Before the first request: compile and capture what a first batch needs (how many
        graphs it captured; 0 where there is nothing to prepare)."""
        ...

    def add_request(self, req: Request) -> None:
        """Queue a request; `ValueError` if it cannot run here (its id already in the engine...)."""
        ...

    def step(self) -> list[Result]:
        """Advance every request by one step; the results of those that finished."""
        ...

    def abort(self, rid: str) -> Result | None:
        """Stop one request now: its partial result, or None if the engine does not hold it."""
        ...

    def abort_all(self) -> list[Result]:
        """Stop every request now; their partial results."""
        ...

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Swap (a subset of) the weights in; the tokens sampled afterwards carry `version`."""
        ...
