"""One-host weight sync: a version written once into a shared-memory file that every rollout server maps.

On one host the byte path moves every byte 1 + N times through Python gRPC (trainer ->
coordinator -> each server, 1.4-2.2 GB/s a hop). Here `ShmExporter.pack` lays the version out
as the byte path does (`plan`, `fill`: the same entries at the same offsets) straight into a file
in /dev/shm, hashes its chunks once on all cores, and the stream carries only the manifest and
one small JSON document (`ShmDoc`: the file, the host, a nonce, the chunk hashes). The manifest's
format is "<fmt>+shm"; the coordinator relays it like any push. A rollout server on the same host
maps the file read-only, checks its header and every chunk's sha256 (on all its cores), and
decodes the tensors straight from the mapping (`WeightStager`): tensors already in the wanted
dtype are views of it, which the engine copies into its parameters. On a GPU host both copies
across PCIe go through page-locked memory: the trainer registers its file with CUDA, a server its
read-only mapping for the one copy to its GPU (pageable where the driver refuses).

Which host. `host_id()` is the kernel's boot id plus the hostname: processes that share a kernel
and a hostname (containers on one machine get their own) share /dev/shm in practice. Rollout
servers say theirs when they attach; the trainer packs by reference only when every attached
server said its own (`WeightPusher`), else bytes. A server that cannot open a file anyway (a
private /dev/shm, another user) refuses the version in one line, and the trainer then pushes the
same version's byte form (the relay takes it: `WeightRelay.byte_form_of`) and bytes afterwards.

Lifetime. One file per version, written before it is announced and never while a reader may
still need it. The exporter keeps the latest version's file (a server that attaches later maps
it), and a version's file once every server serves it or a newer one is either unlinked or, one
at most, kept as the spare the next version is written into (renamed first, header rewritten
before any byte: a late reader sees the new header and refuses, as in `ipc.py`). Writing into a
spare matters: a fresh file pays one page fault per 4 KiB page, several seconds for a 0.6B
version on a small box. `close()` (also at exit) unlinks every file; a reader's mapping outlives
the unlink (the kernel frees the pages at its last unmap), and a reader killed mid-read leaves
nothing behind. Files of a trainer killed with -9 are swept by the next exporter on the host and
by the launcher once every service is down (`slipstream.shm_files`: names carry the writer's pid).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import mmap
import os
import secrets
import socket
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from slipstream.proto import types_pb2
from slipstream.shm_files import PREFIX, SHM_DIR, sweep_orphans, writer_tag
from slipstream.weights.packer import (
    DEFAULT_CHUNK_BYTES,
    FORMATS,
    SHM_SUFFIX,
    WeightError,
    check_chunk_list,
    chunk_hashes,
    document_bytes,
    document_fields,
    fill,
    plan,
    verify_chunks,
)

HEADER_BYTES = 64  # magic, version, nonce, payload bytes (int64 each); payload offsets stay 64-aligned
MAGIC = 0x534C_4950_5753_3031  # "SLIPWS01"
DOC_KIND = "slipstream.shm/1"
MAX_DOC_BYTES = 1 << 20  # a 64 GB version in 8 MiB chunks lists ~8k hashes: ~0.6 MB

log = logging.getLogger(__name__)


def host_id() -> str:
    """This host, as far as shared memory goes: the kernel's boot id and the hostname."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""  # not Linux: no shared-memory weights
    return f"{boot}/{socket.gethostname()}"


@dataclass(frozen=True)
class ShmDoc:
    """What the one chunk of a shared-memory version says: where its bytes are and their hashes."""

    version: int
    host: str  # `host_id()` of the writer
    path: str  # the file in SHM_DIR
    nonce: int  # also in the file's header: proves the file still holds this version
    payload_bytes: int
    chunk_bytes: int
    chunk_sha256: list[str]

    def to_json(self) -> bytes:
        return document_bytes(DOC_KIND, asdict(self))

    @classmethod
    def from_json(cls, data: bytes, version: int) -> ShmDoc:
        """Parse and type-check a document; `version` is the manifest's."""
        try:
            doc = cls(**document_fields(data, DOC_KIND))
        except (ValueError, TypeError) as e:
            raise WeightError(f"version {version}: unreadable shared-memory document ({e})") from None
        if any(type(v) is not int or v < 0 for v in (doc.version, doc.nonce)) or not (
            isinstance(doc.host, str) and isinstance(doc.path, str)
        ):
            raise WeightError(f"version {version}: malformed shared-memory document")
        if doc.version != version:
            raise WeightError(f"version {version}: its shared-memory document is for version {doc.version}")
        path = Path(doc.path)
        if path.parent != SHM_DIR or not path.name.startswith(PREFIX):
            raise WeightError(f"version {version}: {doc.path!r} is not a weights file in {SHM_DIR}")
        check_chunk_list(version, doc.payload_bytes, doc.chunk_bytes, doc.chunk_sha256)
        return doc


def _header(version: int, nonce: int, payload_bytes: int) -> torch.Tensor:
    return torch.tensor([MAGIC, version, nonce, payload_bytes], dtype=torch.int64)


@dataclass
class _Segment:
    path: Path
    buffer: torch.Tensor  # uint8 [HEADER_BYTES + payload], the writable shared mapping
    version: int
    doc: ShmDoc | None = None
    pinned: bool = False  # page-locked for CUDA (a GPU trainer's copy into it)

    def release(self) -> None:
        """Unpin and unlink (the mapping goes with the last reference to `buffer`)."""
        if self.pinned:
            _unpin(self.buffer)
            self.pinned = False
        _unlink(self.path)


class ShmExporter:
    """Trainer side: turns a state dict into a shared-memory version and unlinks what nobody needs."""

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if not SHM_DIR.is_dir():
            raise WeightError(f"shared-memory weights need {SHM_DIR} (use --weight-transport bytes)")
        self.chunk_bytes = chunk_bytes
        self.confirmed = 0
        # Each exporter its own names (after the pid, so the orphan sweep still reads the pid):
        # two in one process never take each other's files for their own.
        self._tag = f"{writer_tag()}{secrets.token_hex(3)}-"
        self._segments: list[_Segment] = []
        self._spare: _Segment | None = None
        sweep_orphans()
        atexit.register(self.close)

    @property
    def files(self) -> list[Path]:
        """The files this exporter holds now (the latest version's, unconfirmed ones, the spare)."""
        spare = [self._spare.path] if self._spare else []
        return [s.path for s in self._segments] + spare

    def confirm(self, version: int) -> None:
        """Every server serves `version` or newer: older versions' files go (one kept as the spare)."""
        self.confirmed = max(self.confirmed, version)
        latest = max((s.version for s in self._segments), default=0)
        done = [s for s in self._segments if s.version <= self.confirmed and s.version < latest]
        for s in sorted(done, key=lambda s: -s.version):  # the newest is kept as the spare
            self._segments.remove(s)
            if self._spare is None:
                self._spare = s
            else:
                s.release()

    def pack(
        self,
        state_dict: dict[str, torch.Tensor],
        version: int,
        fmt: Literal["fp8", "bf16", "int4"] = "fp8",
        int4_targets: str = "auto",
    ) -> tuple[types_pb2.WeightManifest, list[bytes]]:
        """(manifest, [document]): a version to push exactly like `packer.pack`'s output."""
        manifest, pieces, total = plan(state_dict, version, fmt, int4_targets)
        segment = self._segment(version, HEADER_BYTES + total)
        nonce = secrets.randbits(62)
        # Header first: from here on, a late reader of a recycled file sees it holds another version.
        segment.buffer[:32].view(torch.int64).copy_(_header(version, nonce, total))
        payload = segment.buffer[HEADER_BYTES:]
        device = pieces[0][1].device if pieces else torch.device("cpu")
        if device.type == "cpu":
            fill(pieces, payload)  # quantized straight into shared memory
        else:
            segment.pinned = segment.pinned or _pin(segment.buffer, read_only=False)
            payload.copy_(fill(pieces, torch.empty(total, dtype=torch.uint8, device=device)))
        hashes = chunk_hashes(memoryview(payload.numpy()), self.chunk_bytes) if total else []
        doc = ShmDoc(
            version=version, host=host_id(), path=str(segment.path), nonce=nonce, payload_bytes=total,
            chunk_bytes=self.chunk_bytes, chunk_sha256=hashes,
        )  # fmt: skip
        segment.doc = doc
        data = doc.to_json()
        manifest.format = FORMATS[fmt] + SHM_SUFFIX
        manifest.total_bytes = manifest.chunk_bytes = len(data)
        manifest.chunk_sha256.append(hashlib.sha256(data).hexdigest())
        return manifest, [data]

    def byte_form(self, manifest: types_pb2.WeightManifest) -> tuple[types_pb2.WeightManifest, list[bytes]]:
        """The byte path's (manifest, chunks) of a version this exporter holds, for a server that
        cannot map it: the same tensors, bytes and hashes."""
        segment = next((s for s in self._segments if s.version == manifest.version), None)
        if segment is None or segment.doc is None:
            raise WeightError(f"version {manifest.version} is no longer in shared memory")
        doc = segment.doc
        out = types_pb2.WeightManifest()
        out.CopyFrom(manifest)
        out.format = manifest.format.removesuffix(SHM_SUFFIX)
        out.total_bytes, out.chunk_bytes = doc.payload_bytes, doc.chunk_bytes
        out.chunk_sha256[:] = doc.chunk_sha256
        view = memoryview(segment.buffer[HEADER_BYTES:].numpy())
        chunks = [
            view[i : i + doc.chunk_bytes].tobytes() for i in range(0, doc.payload_bytes, doc.chunk_bytes)
        ]
        return out, chunks

    def close(self) -> None:
        """Unlink every file (readers that mapped one keep their mapping)."""
        for segment in self._segments + ([self._spare] if self._spare else []):
            segment.release()
        self._segments, self._spare = [], None

    def _segment(self, version: int, nbytes: int) -> _Segment:
        path = SHM_DIR / f"{self._tag}{version}-{secrets.token_hex(4)}"
        spare, self._spare = self._spare, None
        if spare is not None and spare.buffer.numel() == nbytes:
            os.rename(spare.path, path)  # its pages are faulted in already
            spare.path, spare.version = path, version
            self._segments.append(spare)
            return spare
        if spare is not None:
            spare.release()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserved, not just sized: a /dev/shm too small for it (Docker's default is 64 MB) says
            # ENOSPC here, where a sparse file would kill the writer with SIGBUS mid-version.
            os.posix_fallocate(fd, 0, nbytes)
            mapped = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as e:
            _unlink(path)
            raise WeightError(
                f"cannot make a {nbytes}-byte weights file in {SHM_DIR} ({e.strerror})"
            ) from None
        finally:
            os.close(fd)
        segment = _Segment(path, torch.frombuffer(mapped, dtype=torch.uint8), version)
        self._segments.append(segment)
        return segment


def _pin(t: torch.Tensor, read_only: bool) -> bool:
    """Page-lock the host memory under `t` (its whole storage: a mapping, page-aligned) for fast
    copies to and from the GPU; False without CUDA or when the driver refuses (a read-only mapping
    needs cudaHostRegisterReadOnly support): the copy is then pageable, only slower."""
    if not torch.cuda.is_available():
        return False
    storage = t.untyped_storage()
    flags = 8 if read_only else 0  # cudaHostRegisterReadOnly
    err = torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), flags)
    return int(getattr(err, "value", err)) == 0


def _unpin(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.untyped_storage().data_ptr())


def to_device(payload: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A GPU copy of a mapped payload, through page-locked memory when the driver allows."""
    pinned = _pin(payload, read_only=True)
    try:
        out = payload.to(device, non_blocking=pinned)
        if pinned:
            torch.cuda.current_stream(device).synchronize()  # done before the pages are unlocked
    finally:
        if pinned:
            _unpin(payload)
    return out


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def open_payload(doc: ShmDoc, manifest: types_pb2.WeightManifest) -> torch.Tensor:
    """Receiver side: the version's blob (uint8), a read-only view of the file, its header and
    every chunk's sha256 checked."""
    v = doc.version
    blob_bytes = max((e.offset + e.nbytes for e in manifest.tensors), default=0)
    if doc.payload_bytes != blob_bytes:
        raise WeightError(
            f"version {v}: the shared file holds {doc.payload_bytes} bytes, its manifest lays out {blob_bytes}"
        )
    here = host_id()
    if doc.host != here:
        raise WeightError(
            f"version {v}: its shared-memory file is on host {doc.host!r}, this is {here!r} "
            "(the trainer pushes the byte form next)"
        )
    try:
        fd = os.open(doc.path, os.O_RDONLY)
    except OSError as e:
        raise WeightError(
            f"version {v}: cannot open its shared-memory file ({e.strerror}: {doc.path})"
        ) from None
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES + doc.payload_bytes:
            raise WeightError(
                f"version {v}: its shared-memory file is {size} bytes, smaller than its document says"
            )
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():  # read-only on purpose: nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        shared = torch.frombuffer(mapped, dtype=torch.uint8)
    _check_header(shared, doc, "before")
    payload = shared[HEADER_BYTES : HEADER_BYTES + doc.payload_bytes]
    view = memoryview(mapped)[HEADER_BYTES : HEADER_BYTES + doc.payload_bytes]
    verify_chunks(v, view, doc.chunk_bytes, doc.chunk_sha256, "its shared-memory file")
    _check_header(shared, doc, "while")
    return payload


def _check_header(shared: torch.Tensor, doc: ShmDoc, when: str) -> None:
    magic, version, nonce, _ = shared[:32].view(torch.int64).tolist()
    if magic != MAGIC or version != doc.version or nonce != doc.nonce:
        raise WeightError(
            f"version {doc.version}: the shared-memory file was rewritten by the trainer {when} it was "
            f"read (it now holds version {version}; a newer version follows)"
        )
