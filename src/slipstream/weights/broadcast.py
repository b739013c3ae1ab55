"""Across hosts: a version's bytes broadcast by torch.distributed from the trainer to its weights group.

When rollout servers are not on the trainer's host, the byte path still moves every byte 1 + N
times through Python gRPC. Here the trainer is rank 0 of a process group whose other ranks are the
rollout servers attached when it pushes (gloo: TCP between hosts, from host memory), and a version
is one `broadcast` of its packed blob (`plan`, `fill`: the byte path's layout), while the manifest,
the version and the chunk hashes still go over gRPC: the manifest's format is "<fmt>+broadcast"
and its one chunk is a JSON document (`BroadcastDoc`) naming the rendezvous (the trainer's
`TCPStore`, host:port), the group, each server's rank and the chunk hashes. A rollout server that
fetches it joins the group (`BroadcastReceiver`, kept across versions while the group is the same),
receives the blob, checks every chunk's sha256 on all its cores and decodes it like the byte path.

Who is in a group: the servers the coordinator's status listed at the push (`WeightPusher`). The
same set keeps the same group (no new rendezvous); a server that attaches or leaves makes the next
version start a new one. A server attached after a push is not in its group: it refuses that
version in one line and the trainer pushes the version's byte form (the relay takes it), as for a
shared-memory version a server cannot map. A server that cannot join (an unreachable address, a
firewall, a dead process) makes the broadcast time out (`timeout_s`) on the trainer, which says so
and pushes the byte form; the next version tries a fresh group.

CPU only for now (gloo; a GPU trainer broadcasts the host copy `pack` makes anyway). NCCL between
GPUs is the next step: the group and the document already name their backend.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from slipstream.proto import types_pb2
from slipstream.weights.packer import (
    BROADCAST_SUFFIX,
    DEFAULT_CHUNK_BYTES,
    FORMATS,
    WeightError,
    check_chunk_list,
    chunk_hashes,
    document_bytes,
    document_fields,
    fill,
    plan,
    verify_chunks,
)

DOC_KIND = "slipstream.broadcast/1"
MAX_DOC_BYTES = 1 << 20  # hashes of a 64 GB version in 8 MiB chunks plus one rank per server
JOIN_TIMEOUT_S = 30.0  # every member joins and the blob arrives within this, else the byte form

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BroadcastDoc:
    """What the one chunk of a broadcast version says: the group to join and the chunk hashes."""

    version: int
    store: str  # host:port of the trainer's TCPStore (the rendezvous)
    group: int  # the group's number on that store; the same for versions with the same members
    backend: str  # "gloo"
    ranks: dict[str, int]  # server_id -> rank (the trainer is 0)
    payload_bytes: int
    chunk_bytes: int
    chunk_sha256: list[str]

    def to_json(self) -> bytes:
        return document_bytes(DOC_KIND, asdict(self))

    @classmethod
    def from_json(cls, data: bytes, version: int) -> BroadcastDoc:
        """Parse and type-check a document; `version` is the manifest's."""
        try:
            doc = cls(**document_fields(data, DOC_KIND))
        except (ValueError, TypeError) as e:
            raise WeightError(f"version {version}: unreadable broadcast document ({e})") from None
        ranks = doc.ranks
        if (
            type(doc.version) is not int
            or type(doc.group) is not int
            or not isinstance(doc.store, str)
            or doc.store.rpartition(":")[2].isdigit() is False
            or doc.backend != "gloo"
            or not isinstance(ranks, dict)
            or sorted(ranks.values()) != list(range(1, len(ranks) + 1))
        ):
            raise WeightError(f"version {version}: malformed broadcast document")
        if doc.version != version:
            raise WeightError(f"version {version}: its broadcast document is for version {doc.version}")
        check_chunk_list(version, doc.payload_bytes, doc.chunk_bytes, doc.chunk_sha256)
        return doc


def _options(timeout_s: float, local_address: str) -> dist.ProcessGroupGloo._Options:
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address)]
    return options


def _advertised(host: str) -> str:
    """The address others dial for a service bound to `host` (a wildcard is not dialable)."""
    return socket.gethostname() if host in ("", "0.0.0.0", "::") else host


def _route_to(host: str, port: int) -> str:
    """This host's address on the route to host:port (the interface the group's traffic takes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: picks the route, sends nothing
        return s.getsockname()[0]


class BroadcastExporter:
    """Trainer side: rank 0 of the weights group; packs a version into a host blob it broadcasts."""

    def __init__(self, host: str, timeout_s: float = JOIN_TIMEOUT_S, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.timeout_s, self.chunk_bytes = timeout_s, chunk_bytes
        self._store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        self.address = f"{_advertised(host)}:{self._store.port}"
        self._bind = host if host not in ("", "0.0.0.0", "::") else _advertised(host)
        self._groups = 0
        self._group: tuple[int, tuple[str, ...], dist.ProcessGroup | None] | None = (
            None  # (number, members, pg)
        )
        self._latest: tuple[int, torch.Tensor, BroadcastDoc] | None = None  # (version, blob, doc)
        self._spare: torch.Tensor | None = None  # the previous blob, written into next (no fresh pages)

    def pack(
        self,
        state_dict: dict[str, torch.Tensor],
        version: int,
        members: list[str],
        fmt: Literal["fp8", "bf16", "int4"] = "fp8",
        int4_targets: str = "auto",
    ) -> tuple[types_pb2.WeightManifest, list[bytes]]:
        """(manifest, [document]) for `members` (server ids, ranks 1..N in this order); `send` then
        broadcasts the blob once they joined."""
        if not members:
            raise WeightError("a broadcast needs at least one rollout server in the group")
        manifest, pieces, total = plan(state_dict, version, fmt, int4_targets)
        blob = self._spare if self._spare is not None and self._spare.numel() == total else None
        if blob is None:
            blob = torch.empty(total, dtype=torch.uint8)
        device = pieces[0][1].device if pieces else torch.device("cpu")
        if device.type == "cpu":
            fill(pieces, blob)
        else:
            blob.copy_(fill(pieces, torch.empty(total, dtype=torch.uint8, device=device)))
        members_key = tuple(members)
        if self._group is None or self._group[1] != members_key:
            self._drop_group()
            self._groups += 1
            self._group = (self._groups, members_key, None)  # joined in `send`
        doc = BroadcastDoc(
            version=version, store=self.address, group=self._group[0], backend="gloo",
            ranks={server_id: rank for rank, server_id in enumerate(members, start=1)}, payload_bytes=total,
            chunk_bytes=self.chunk_bytes, chunk_sha256=chunk_hashes(memoryview(blob.numpy()), self.chunk_bytes),
        )  # fmt: skip
        if self._latest is not None:
            self._spare = self._latest[1]
        self._latest = (version, blob, doc)
        data = doc.to_json()
        manifest.format = FORMATS[fmt] + BROADCAST_SUFFIX
        manifest.total_bytes = manifest.chunk_bytes = len(data)
        manifest.chunk_sha256.append(hashlib.sha256(data).hexdigest())
        return manifest, [data]

    def send(self, version: int) -> None:
        """Broadcast `version`'s blob to its group (joining it first if new); `WeightError` when a
        member does not join or the transfer fails within `timeout_s` (the group is dropped)."""
        if self._latest is None or self._latest[0] != version or self._group is None:
            raise WeightError(f"version {version} is not the latest packed for broadcast")
        number, members, pg = self._group
        try:
            if pg is None:
                store = dist.PrefixStore(f"weights-group-{number}", self._store)
                pg = dist.ProcessGroupGloo(store, 0, len(members) + 1, _options(self.timeout_s, self._bind))
                self._group = (number, members, pg)
            pg.broadcast([self._latest[1]], dist.BroadcastOptions()).wait()
        except RuntimeError as e:  # gloo's timeouts and connection errors
            self._drop_group()
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightError(
                f"broadcast of version {version} to {', '.join(members)} failed within "
                f"{self.timeout_s:.0f}s ({reason})"
            ) from None

    def byte_form(self, manifest: types_pb2.WeightManifest) -> tuple[types_pb2.WeightManifest, list[bytes]]:
        """The byte path's (manifest, chunks) of the latest version: the same tensors, bytes and hashes."""
        if self._latest is None or self._latest[0] != manifest.version:
            raise WeightError(f"version {manifest.version} is no longer held for broadcast")
        _, blob, doc = self._latest
        out = types_pb2.WeightManifest()
        out.CopyFrom(manifest)
        out.format = manifest.format.removesuffix(BROADCAST_SUFFIX)
        out.total_bytes, out.chunk_bytes = doc.payload_bytes, doc.chunk_bytes
        out.chunk_sha256[:] = doc.chunk_sha256
        view = memoryview(blob.numpy())
        return out, [
            view[i : i + doc.chunk_bytes].tobytes() for i in range(0, doc.payload_bytes, doc.chunk_bytes)
        ]

    def members(self, version: int) -> set[str]:
        """The servers version `version` was broadcast to (empty if it is not the latest)."""
        if self._latest is None or self._latest[0] != version:
            return set()
        return set(self._latest[2].ranks)

    def confirm(self, version: int) -> None:
        """(The latest blob is all this exporter holds: nothing to free.)"""

    def close(self) -> None:
        self._drop_group()

    def _drop_group(self) -> None:
        self._group = None  # the pg's connections close with it


class BroadcastReceiver:
    """Rollout server side: joins the weights group a version names (kept while it stays the same),
    receives the blob and checks its chunks."""

    def __init__(self, server_id: str, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        self.server_id, self.timeout_s = server_id, timeout_s
        self._group: tuple[tuple[str, int], dist.ProcessGroup] | None = None
        self._buffer: torch.Tensor | None = None  # reused: a fresh 0.75 GB costs a page fault per 4 KiB

    def receive(self, doc: BroadcastDoc, manifest: types_pb2.WeightManifest) -> torch.Tensor:
        """The version's blob (uint8, host memory), every chunk's sha256 checked. The buffer is
        reused by the next version: its tensors are only valid until then (the engine copies them)."""
        v = doc.version
        blob_bytes = max((e.offset + e.nbytes for e in manifest.tensors), default=0)
        if doc.payload_bytes != blob_bytes:
            raise WeightError(
                f"version {v}: the broadcast carries {doc.payload_bytes} bytes, its manifest lays out {blob_bytes}"
            )
        rank = doc.ranks.get(self.server_id)
        if rank is None:
            raise WeightError(
                f"version {v}: server {self.server_id!r} is not in its weights group (it attached after "
                "the push; the trainer pushes the byte form next)"
            )
        key = (doc.store, doc.group)
        try:
            if self._group is None or self._group[0] != key:
                self._group = None
                host, _, port = doc.store.rpartition(":")
                store = dist.TCPStore(
                    host, int(port), is_master=False, timeout=timedelta(seconds=self.timeout_s)
                )
                options = _options(self.timeout_s, _route_to(host, int(port)))
                pg = dist.ProcessGroupGloo(
                    dist.PrefixStore(f"weights-group-{doc.group}", store), rank, len(doc.ranks) + 1, options
                )
                self._group = (key, pg)
            if self._buffer is None or self._buffer.numel() != doc.payload_bytes:
                self._buffer = torch.empty(doc.payload_bytes, dtype=torch.uint8)
            self._group[1].broadcast([self._buffer], dist.BroadcastOptions()).wait()
        except (RuntimeError, OSError, ValueError) as e:
            self._group = None
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightError(
                f"version {v}: could not receive its broadcast from {doc.store} ({reason})"
            ) from None
        verify_chunks(v, memoryview(self._buffer.numpy()), doc.chunk_bytes, doc.chunk_sha256, "its broadcast")
        return self._buffer
