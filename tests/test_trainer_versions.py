"""Policy versions between trainer and coordinator, through a real gRPC server on port 0.

The coordinator refuses a version it already holds (or an older one) with status
ALREADY_EXISTS; the trainer recognises that status, not the words of the message
(`weight_push.VersionHeld`), and the version rules of `versions.py` (start, adopt, push again,
the push cadence) and the checkpointer's save cadence follow from plain data.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import torch

from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc
from slipstream.rpc.channel import sync_channel
from slipstream.services.trainer.checkpointer import Checkpointer
from slipstream.services.trainer.parallel import Parallel
from slipstream.services.trainer.reconnect import Reconnect
from slipstream.services.trainer.versions import Versions
from slipstream.services.trainer.weight_push import VersionHeld, WeightPusher

WEIGHTS = {"model.norm.weight": torch.ones(8)}


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Holds a version and whether it has its weights; refuses a push that is not newer."""

    def __init__(self, version: int = 0, weights_held: bool = True, refusal=grpc.StatusCode.ALREADY_EXISTS):
        self.version, self.weights_held, self.refusal = version, weights_held, refusal
        self.pushed: list[int] = []

    def PushWeights(self, request_iterator, context):  # noqa: N802 - gRPC method name
        version = next(request_iterator).manifest.version
        for _ in request_iterator:  # the chunks
            pass
        if version <= self.version and self.weights_held:
            context.abort(self.refusal, f"version {version} is not newer than the current {self.version}")
        self.version, self.weights_held = version, True
        self.pushed.append(version)
        return coordinator_pb2.PushWeightsReply(version=version)

    def GetStatus(self, request, context):  # noqa: N802
        return coordinator_pb2.CoordinatorStatus(policy_version=self.version, weights_held=self.weights_held)


@pytest.fixture
def coordinator():
    """(servicer, WeightPusher talking to it)."""
    servicer = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = sync_channel(f"127.0.0.1:{port}")
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    yield servicer, WeightPusher(stub, "bf16", timeout=10.0, reconnect=Reconnect(5.0))
    channel.close()
    server.stop(grace=None)


def test_a_version_the_coordinator_holds_is_refused_as_version_held(coordinator):
    servicer, pusher = coordinator
    servicer.version = 3
    with pytest.raises(VersionHeld, match="ALREADY_EXISTS"):
        pusher.push(WEIGHTS, 3)
    pusher.push(WEIGHTS, 4)
    assert servicer.pushed == [4]


def test_push_again_accepts_already_held_and_nothing_else(coordinator):
    servicer, pusher = coordinator
    pusher.push(WEIGHTS, 2)
    # Another report got there first: the coordinator holds v2 again. Not an error.
    pusher.push_again()
    assert servicer.pushed == [2]
    # The coordinator restarted without weights: the same bytes go again.
    servicer.weights_held = False
    pusher.push_again()
    assert servicer.pushed == [2, 2]
    # Any other refusal is one, whatever its message says.
    servicer.refusal = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT") as e:
        pusher.push_again()
    assert not isinstance(e.value, VersionHeld)


@pytest.mark.parametrize(
    "held, weights_held, resumed, pushed, version",
    [
        (0, True, 0, [], 0),  # a fresh run: nothing to push before the first step
        (5, True, 3, [6], 6),  # the coordinator is ahead of the checkpoint: push as its version + 1
        (2, True, 3, [3], 3),  # behind: push the checkpoint's version
        (3, False, 3, [3], 3),  # restarted without weights: the same version again
        (3, True, 3, [], 3),  # holds it: keep the bytes (for a later restart), send nothing
    ],
)
def test_startup_push(coordinator, held, weights_held, resumed, pushed, version):
    servicer, pusher = coordinator
    servicer.version, servicer.weights_held = held, weights_held
    versions = Versions(pusher, update_weights_interval=1)
    assert versions.start(resumed, lambda due: WEIGHTS if due else None) == version
    assert servicer.pushed == pushed
    assert pusher.version == (version if version else 0)


def test_reports_adopt_a_newer_coordinator_version_and_refill_a_restarted_one(coordinator):
    servicer, pusher = coordinator
    versions = Versions(pusher, update_weights_interval=2)
    version, push_s = versions.after_step(1, 0, lambda due: WEIGHTS if due else None)
    assert (version, push_s, servicer.pushed) == (0, 0.0, [])  # step 1 of 2: no push due
    version, _ = versions.after_step(2, version, lambda due: WEIGHTS if due else None)
    assert version == 1 and servicer.pushed == [1]
    servicer.weights_held = False  # the coordinator restarted: it kept only the number
    status = coordinator_pb2.CoordinatorStatus(policy_version=1, weights_held=False)
    assert versions.after_report(status, version) == 1 and servicer.pushed == [1, 1]  # refilled
    status = coordinator_pb2.CoordinatorStatus(policy_version=4, weights_held=True)
    assert versions.after_report(status, version) == 4  # adopted


@pytest.mark.parametrize("interval", [0, 1, 3, 7])
@pytest.mark.parametrize("saved_at", [-1, 0, 6])
def test_the_checkpointer_owns_the_save_cadence(interval, saved_at):
    c = Checkpointer(None, interval, None, None, Parallel(), saved_at=saved_at)  # type: ignore[arg-type]
    saved: list[int] = []
    c.save = lambda step: (saved.append(step), setattr(c, "saved_at", step))  # type: ignore[method-assign]
    start = max(saved_at, 0)
    for step in range(start + 1, start + 22):
        c.maybe_save(step)
    c.maybe_save(start + 21, last=True)
    c.maybe_save(start + 21, last=True)  # a second stop at the same step saves nothing new
    periodic = [s for s in range(start + 1, start + 22) if interval and s % interval == 0]
    assert saved == periodic + ([] if periodic and periodic[-1] == start + 21 else [start + 21])
    # Stopped before any step of a resumed run: that step is the checkpoint it resumed from.
    resumed = Checkpointer(None, interval, None, None, Parallel(), saved_at=saved_at)  # type: ignore[arg-type]
    assert resumed.due(saved_at, last=True) is False
