"""Pushing a new policy version to the coordinator (which fans it out to every rollout server).

The weights are packed in the wire format of `slipstream.weights` (FP8 e4m3 with 128x128
block scales by default; int4 for the --int4-qat-targets weights under --weight-sync-dtype int4)
and streamed as one manifest followed by chunks.

A push survives a coordinator restart. PushWeights is not idempotent (a version is accepted
once), so a push whose reply was lost (UNAVAILABLE) is not simply repeated: GetStatus says
whether the coordinator holds that version now, and only if not is it sent again. The bytes of
the last version pushed are kept, so a coordinator that restarted and holds no weights
(`CoordinatorStatus.weights_held` false; it persisted only the version number) gets exactly the
same version again without the trainer touching its model.

Who holds a version is data, not text: the coordinator refuses a version that is not newer than
the one it holds with gRPC status ALREADY_EXISTS, which `_send` raises as `VersionHeld`. The
rules about which version to push when are in `versions.py`.
"""

from __future__ import annotations

import logging
import time

import grpc
import torch

from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from slipstream.weights import IpcExporter, iter_messages, pack

from .reconnect import Reconnect, Unreachable, describe, retryable

log = logging.getLogger("slipstream.trainer")


class VersionHeld(RuntimeError):
    """The coordinator already holds this version or a newer one (ALREADY_EXISTS)."""


class WeightPusher:
    def __init__(
        self,
        stub: coordinator_pb2_grpc.CoordinatorStub,
        fmt: str,
        timeout: float,
        reconnect: Reconnect,
        what: str = "coordinator",
        colocate: bool = False,
        int4_targets: str = "auto",
    ):
        self.int4_targets = int4_targets  # --int4-qat-targets: the int4 format's int4 weights
        self.stub, self.fmt, self.timeout, self.reconnect, self.what = stub, fmt, timeout, reconnect, what
        self.last: tuple[types_pb2.WeightManifest, list[bytes]] | None = None  # the last version pushed
        # --colocate on a GPU: a version travels as CUDA IPC handles of a device buffer this process
        # keeps until every rollout server serves it (`confirm`); the same manifest and protocol.
        self.ipc = IpcExporter() if colocate else None

    @property
    def version(self) -> int:
        return self.last[0].version if self.last else 0

    def push(self, state_dict: dict[str, torch.Tensor], version: int, send: bool = True) -> tuple[float, int]:
        """Pack and push one version (send=False: only keep its bytes); returns (seconds, bytes)."""
        t0 = time.perf_counter()
        # `pack` quantizes where the tensors are (on the GPU for a GPU trainer) and copies each
        # result to the host once; copying the full-precision weights first would double the traffic.
        weights = {k: v.detach() for k, v in state_dict.items()}
        self.last = (
            self.ipc.pack(weights, version, self.fmt, self.int4_targets)
            if self.ipc
            else pack(weights, version, self.fmt, int4_targets=self.int4_targets)
        )
        if send:
            self._send()
        return time.perf_counter() - t0, self.last[0].total_bytes

    def push_again(self) -> None:
        """The last version again, to a coordinator that restarted without it."""
        if self.last is None:
            return
        log.info("coordinator holds no weights (it restarted): pushing v%d again", self.version)
        try:
            self._send()
        except VersionHeld:
            log.info("coordinator already holds v%d", self.version)  # another report got there first

    def confirm(self, status: coordinator_pb2.CoordinatorStatus) -> None:
        """Free the IPC buffers of versions every rollout server now serves."""
        if self.ipc is not None and status.server_versions:
            self.ipc.confirm(min(status.server_versions.values()))

    def status(self) -> coordinator_pb2.CoordinatorStatus:
        return self.reconnect.call(
            f"{self.what} (GetStatus)",
            lambda: self.stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=self.timeout),
        )

    def _send(self) -> None:
        manifest, chunks = self.last
        version = manifest.version
        deadline = time.monotonic() + self.reconnect.timeout
        while True:
            try:
                reply = self.stub.PushWeights(iter_messages(manifest, chunks), timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
                    raise VersionHeld(f"pushing weights v{version}: {describe(e)}") from None
                if not (retryable(e) or e.code() == grpc.StatusCode.DEADLINE_EXCEEDED):  # type: ignore[attr-defined]
                    raise RuntimeError(f"pushing weights v{version} failed: {describe(e)}") from None
                if time.monotonic() > deadline:
                    raise Unreachable(
                        f"{self.what} unreachable for {self.reconnect.timeout:.0f}s (--reconnect-timeout) "
                        f"while pushing weights v{version}: {describe(e)}"
                    ) from None
                status = self.status()  # waits for the coordinator to come back
                if status.policy_version >= version and status.weights_held:
                    log.info("push of v%d: the reply was lost but the version landed", version)
                    return
                log.warning("push of v%d did not land (%s); pushing again", version, describe(e))
                continue
            if reply.version != version:
                raise RuntimeError(f"coordinator accepted v{reply.version}, expected v{version}")
            return
