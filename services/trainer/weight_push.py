"""Pushing a new policy version to the coordinator (which fans it out to every rollout server).

The weights are packed in the wire format of `slipstream.weights` (FP8 e4m3 with 128x128
block scales by default; int4 for the --int4-qat-targets weights under --weight-sync-dtype int4)
and streamed as one manifest followed by chunks. How the bytes travel is --weight-transport
(`transport` below): through the coordinator, or by reference: CUDA IPC handles when colocated
on a GPU, a /dev/shm file when every rollout server is on this host (their Hello says theirs),
or a torch.distributed broadcast to the attached servers (--weight-transport broadcast). A server
a version by reference cannot reach (another host, a private /dev/shm, attached after the push,
not joining the broadcast) gets that version's byte form, pushed as the same version; with shm,
bytes are pushed from then on while it is attached (said once per server).

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
from slipstream.weights import IpcExporter, WeightError, iter_messages, pack
from slipstream.weights.broadcast import BroadcastExporter
from slipstream.weights.packer import BROADCAST_SUFFIX, SHM_SUFFIX, by_reference
from slipstream.weights.shm import SHM_DIR, ShmExporter, host_id

from .reconnect import Reconnect, Unreachable, describe, retryable

log = logging.getLogger("slipstream.trainer")


class VersionHeld(RuntimeError):
    """The coordinator already holds this version or a newer one (ALREADY_EXISTS)."""


def transport(requested: str, colocated_gpu: bool) -> str:
    """--weight-transport resolved for this trainer: auto = ipc colocated on a GPU, else shm (which
    pushes bytes while a server is elsewhere); ipc needs the colocated GPU."""
    if requested == "ipc" and not colocated_gpu:
        raise ValueError("--weight-transport ipc needs the trainer on the rollout servers' GPU (--colocate)")
    if requested == "auto":
        return "ipc" if colocated_gpu else "shm"
    return requested


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
        weight_transport: str = "auto",
        host: str = "127.0.0.1",
    ):
        """`host`: the address this trainer binds (--host); a broadcast group's rendezvous listens there."""
        self.int4_targets = int4_targets  # --int4-qat-targets: the int4 format's int4 weights
        self.stub, self.fmt, self.timeout, self.reconnect, self.what = stub, fmt, timeout, reconnect, what
        self.last: tuple[types_pb2.WeightManifest, list[bytes]] | None = None  # the last version pushed
        self.transport = transport(weight_transport, colocate)
        # ipc: a version travels as CUDA IPC handles of a device buffer this process keeps until
        # every rollout server serves it (`after_status`); the same manifest and protocol.
        self.ipc = IpcExporter() if self.transport == "ipc" else None
        self.host = host_id() if self.transport == "shm" and SHM_DIR.is_dir() else ""
        self.shm = ShmExporter() if self.host else None
        self.elsewhere: set[str] = set()  # servers that cannot read this host's /dev/shm (said once each)
        self.broadcast = BroadcastExporter(host) if self.transport == "broadcast" else None

    @property
    def version(self) -> int:
        return self.last[0].version if self.last else 0

    def push(self, state_dict: dict[str, torch.Tensor], version: int, send: bool = True) -> tuple[float, int]:
        """Pack and push one version (send=False: only keep its bytes); returns (seconds, bytes)."""
        t0 = time.perf_counter()
        # `pack` quantizes where the tensors are (on the GPU for a GPU trainer) and copies each
        # result to the host once; copying the full-precision weights first would double the traffic.
        weights = {k: v.detach() for k, v in state_dict.items()}
        if self.ipc:
            self.last = self.ipc.pack(weights, version, self.fmt, self.int4_targets)
        elif self.shm and not self.elsewhere and (shared := self._shm_pack(weights, version)):
            self.last = shared
        elif self.broadcast and send and (members := sorted(s.server_id for s in self.status().servers)):
            # The group is who is attached now (one GetStatus): a server that attached since the
            # last report is in it, one that left does not hold the broadcast up.
            self.last = self.broadcast.pack(weights, version, members, self.fmt, self.int4_targets)
        else:
            self.last = pack(weights, version, self.fmt, int4_targets=self.int4_targets)
        if send:
            self._deliver()
        return time.perf_counter() - t0, self.last[0].total_bytes

    def push_again(self) -> None:
        """The last version again, to a coordinator that restarted without it."""
        if self.last is None:
            return
        log.info("coordinator holds no weights (it restarted): pushing v%d again", self.version)
        if self.last[0].format.endswith(BROADCAST_SUFFIX):
            # Its group has it already; whoever does not gets bytes (a second broadcast would wait
            # for servers that hold the version and never fetch it).
            self.last = self.broadcast.byte_form(self.last[0])
        try:
            self._send()
        except VersionHeld:
            log.info("coordinator already holds v%d", self.version)  # another report got there first

    def after_status(self, status: coordinator_pb2.CoordinatorStatus) -> None:
        """Free the buffers and files of versions every rollout server now serves; when an attached
        server cannot get the current version by reference (another host, not in its broadcast
        group), push that version's byte form."""
        if status.server_versions:
            for exporter in (self.ipc, self.shm):
                if exporter is not None:
                    exporter.confirm(min(status.server_versions.values()))
        if self.shm is not None:
            self.elsewhere &= {s.server_id for s in status.servers}  # one that left holds nothing back
            for s in status.servers:
                if s.host_id != self.host and s.server_id not in self.elsewhere:
                    self.elsewhere.add(s.server_id)
                    log.warning(
                        "rollout server %s is not on this host or cannot open its /dev/shm (host %r): "
                        "weights go to it as bytes", s.server_id, s.host_id,
                    )  # fmt: skip
        if self.last is None or not by_reference(self.last[0].format) or self.ipc is not None:
            return
        version = self.last[0].version
        unreached = sorted(
            s.server_id
            for s in status.servers
            if s.policy_version < version and not self._reaches(s, version)
        )
        if unreached:
            self._push_byte_form(f"for {', '.join(unreached)}")

    def close(self) -> None:
        """Release what the versions by reference hold (/dev/shm files, the broadcast group)."""
        for exporter in (self.shm, self.broadcast):
            if exporter is not None:
                exporter.close()

    def _shm_pack(self, weights: dict[str, torch.Tensor], version: int):
        """The version in /dev/shm, or None (said once, bytes from then on) when it does not fit there."""
        try:
            return self.shm.pack(weights, version, self.fmt, self.int4_targets)
        except WeightError as e:
            log.warning("%s: weights go as bytes from now on (--weight-transport)", e)
            self.shm.close()
            self.shm = None
            return None

    def _reaches(self, server: coordinator_pb2.RolloutServerStatus, version: int) -> bool:
        """Whether the current version by reference can reach `server`."""
        if self.shm is not None:
            return server.host_id == self.host
        return self.broadcast is not None and server.server_id in self.broadcast.members(version)

    def _deliver(self) -> None:
        """Push the last version; a broadcast version's blob then goes to its group (the byte form
        when it cannot)."""
        self._send()
        manifest = self.last[0]
        if self.broadcast is not None and manifest.format.endswith(BROADCAST_SUFFIX):
            try:
                self.broadcast.send(manifest.version)
            except WeightError as e:
                self._push_byte_form(f"({e})")

    def _push_byte_form(self, why: str) -> None:
        manifest = self.last[0]
        exporter = self.shm if manifest.format.endswith(SHM_SUFFIX) else self.broadcast
        try:
            self.last = exporter.byte_form(manifest)
        except WeightError as e:
            log.warning("cannot push the byte form of v%d: %s", manifest.version, e)
            return
        log.warning("pushing v%d again as bytes %s", manifest.version, why)
        try:
            self._send()
        except VersionHeld:
            log.info("coordinator holds a newer version than v%d", manifest.version)

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
