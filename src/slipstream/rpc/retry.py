"""Which calls are retried, and how: idempotent ones only, on UNAVAILABLE only.

A retry is safe only when doing a call twice has the effect of doing it once. These are:
health checks and status reads; `ReportProgress` (the coordinator keeps the highest step it
was told, so a repeat changes nothing); `FetchWeights` (a read of a stored version); `Score`
(a pure function of the samples sent). Never retried: `PushWeights` (a repeated version is
refused as not newer, so a retry after a lost reply would turn success into an error),
`Generate` (expensive, and the caller decides) and the `Attach` stream (the rollout server
reconnects with its own backoff, and the coordinator re-dispatches what the broken stream held).

And only on UNAVAILABLE: the call did not reach a working server (refused connection, a peer
restarting, a GOAWAY). DEADLINE_EXCEEDED is not retried: the call may have run, and its
deadline is the caller's budget for all attempts anyway. gRPC implements the policy itself
from the channel's service config (`grpc.service_config`), with jittered exponential backoff;
a streaming call is retried only until its first response message arrives.
"""

from __future__ import annotations

import json

IDEMPOTENT: dict[str, tuple[str, ...]] = {
    "grpc.health.v1.Health": ("Check",),
    "slipstream.v1.Coordinator": ("GetStatus", "ReportProgress", "FetchWeights"),
    "slipstream.v1.Rollout": ("GetInfo",),
    "slipstream.v1.Reward": ("Score",),
    "slipstream.v1.Trainer": ("GetState",),
}
MAX_ATTEMPTS = 5  # the first call and up to four retries, all within the call's deadline
INITIAL_BACKOFF_S = 0.2
MAX_BACKOFF_S = 2.0


def retry_policy() -> dict:
    return {
        "maxAttempts": MAX_ATTEMPTS,
        "initialBackoff": f"{INITIAL_BACKOFF_S}s",
        "maxBackoff": f"{MAX_BACKOFF_S}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }


def service_config() -> str:
    """The channel's service config (JSON): the retry policy on every idempotent method."""
    names = [{"service": service, "method": m} for service, methods in IDEMPOTENT.items() for m in methods]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": retry_policy()}]})


def is_idempotent(method: str) -> bool:
    """`method` as gRPC spells it, `/package.Service/Method`."""
    service, _, name = method.lstrip("/").partition("/")
    return name in IDEMPOTENT.get(service, ())
