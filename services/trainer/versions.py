"""Policy versions: when the trainer makes one, and how it stays in step with the coordinator.

The trainer numbers versions; the coordinator holds the newest one it was given and refuses any
push that is not newer (gRPC status ALREADY_EXISTS, `weight_push.VersionHeld`). Every
--update-weights-interval steps the trainer pushes its weights as the next version. All the
rules that keep versions strictly increasing across crashes and restarts are here:

- start: weights are pushed before the step's checkpoint (a rollout server should not wait for
  disk), so a trainer can die after pushing version v and resume from a checkpoint of v-1.
  When the coordinator's version is ahead of the checkpoint's, the resumed trainer pushes its
  weights as coordinator version + 1. When the coordinator is behind, or restarted and holds
  no weights (`weights_held` false), the trainer pushes its checkpoint's version again.
- adopt: a progress report that shows the coordinator ahead (another pusher, a lost reply)
  makes the trainer number its next version after the coordinator's.
- push again: a coordinator that restarted keeps only the version number; a report that says
  so gets the last version's bytes again (kept by `WeightPusher`), and a refusal because the
  coordinator already holds it (another report got there first) is fine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from slipstream.proto import coordinator_pb2

from .weight_push import WeightPusher

log = logging.getLogger("slipstream.trainer")
Gather = Callable[[bool], dict[str, torch.Tensor] | None]  # every rank joins; rank 0 gets the weights


class Versions:
    def __init__(self, pusher: WeightPusher, update_weights_interval: int):
        self.pusher, self.interval = pusher, update_weights_interval

    def push_due(self, step: int) -> bool:
        """Whether step `step` (1-based) ends with a push of a new version."""
        return step % self.interval == 0

    def start(self, version: int, gather: Gather) -> int:
        """Before the first step: push what the coordinator needs; returns the trainer's version."""
        push = self._startup_version(version)
        # A resumed trainer keeps its version's bytes even when the coordinator has them: should
        # the coordinator restart later, they are what it must get again.
        weights = gather(push is not None or version > 0)
        if weights is not None:
            version = version if push is None else push
            self.pusher.push(weights, version, send=push is not None)
        return version

    def _startup_version(self, version: int) -> int | None:
        status = self.pusher.status()
        self.pusher.after_status(status)  # which servers are attached, and where
        if status.policy_version > version:
            log.info(
                "coordinator is at v%d, ahead of this checkpoint's v%d: pushing these weights as v%d",
                status.policy_version, version, status.policy_version + 1,
            )  # fmt: skip
            return status.policy_version + 1
        if version > 0 and (status.policy_version < version or not status.weights_held):
            return version
        return None

    def after_step(self, step: int, version: int, gather: Gather) -> tuple[int, float]:
        """Push the next version if one is due: (the trainer's version, seconds spent pushing)."""
        weights = gather(self.push_due(step))
        if weights is None:
            return version, 0.0
        seconds, _ = self.pusher.push(weights, version + 1)
        return version + 1, seconds

    def after_report(self, status: coordinator_pb2.CoordinatorStatus, version: int) -> int:
        """Free confirmed IPC buffers and /dev/shm files (bytes to a server that cannot map them), push
        again to a coordinator that lost its weights, adopt a newer coordinator version; returns the
        trainer's version."""
        self.pusher.after_status(status)
        if not status.weights_held and self.pusher.version and status.policy_version <= self.pusher.version:
            self.pusher.push_again()  # the coordinator restarted and kept only the version number
        if status.policy_version > version:  # another pusher, or a lost future
            log.warning("coordinator is at v%d, ahead of v%d: adopting it", status.policy_version, version)
            return status.policy_version
        return version

    def await_servers(self, version: int, timeout_s: float = 60.0) -> coordinator_pb2.CoordinatorStatus:
        """At the end of a run, give rollout servers a moment to apply `version` (for the record)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.pusher.status()
            if all(v >= version for v in status.server_versions.values()) or time.monotonic() > deadline:
                return status
            time.sleep(0.2)
