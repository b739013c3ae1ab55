"""Colocated weight sync: the same versioned protocol, carrying a CUDA IPC handle instead of bytes.

When the trainer and a rollout server share a GPU, copying a version to the host and back is
pure waste. `IpcExporter.pack` lays the version out exactly as the byte path does (`plan`,
`fill`: same entries, same offsets, quantized on the GPU) but into a device buffer it keeps, and
the one chunk of the stream is a small JSON document (`IpcDoc`) holding that buffer's CUDA IPC
handle. The manifest's format is "<fmt>+cuda-ipc"; everything else about the stream is
unchanged, so the coordinator relays and checks it like any push (hash, order, byte count) and
the rollout server's `WeightStager` stages it through the same `add`/`finish`.

Nothing is pickled: the handle is the fields of `UntypedStorage._share_cuda_()` (what
`torch.multiprocessing.reductions.reduce_tensor` sends), written as JSON with base64 bytes, and
the receiver rebuilds the storage with `UntypedStorage._new_shared_cuda`, the call
`rebuild_cuda_tensor` makes, never unpickling anything.

Lifetime, and why a stale handle cannot go unnoticed. The exporter keeps each version's buffer
until `confirm(version)` (the trainer calls it once the rollout servers report serving that
version); buffers are then reused, so steady state allocates nothing. If more than
`max_unconfirmed` versions wait, the oldest buffer is reused anyway (a receiver that never
answers must not pin the trainer's memory). Each buffer starts with a 64-byte header (magic,
version, random nonce) that the sender rewrites *before* overwriting any data; the receiver
checks it before and after copying the payload into its own memory, so a version overwritten
before or while it was read is refused ("overwritten by the sender"), never applied torn.

Refusals are one `WeightError` line: the sender's GPU is not visible here (the doc carries the
device UUID, not an index that depends on CUDA_VISIBLE_DEVICES), the handle does not open (other
host or container, released memory, the sender's own process), or the header disagrees.
Known limit: `expandable_segments` in PYTORCH_CUDA_ALLOC_CONF makes CUDA IPC fail in PyTorch.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from slipstream.proto import types_pb2
from slipstream.weights.packer import (
    FORMATS,
    IPC_SUFFIX,
    WeightError,
    document_bytes,
    document_fields,
    fill,
    plan,
)

HEADER_BYTES = 64
MAX_DOC_BYTES = 64 * 1024
MAGIC = 0x534C_4950_5743_3031  # "SLIPWC01"
DOC_KIND = "slipstream.cuda-ipc/1"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IpcDoc:
    """What the one chunk of a colocated version says: where the payload lives and how to open it."""

    version: int
    device_uuid: str  # the sender's GPU; the receiver maps it to its own device index
    nonce: int  # also in the buffer's header: proves the buffer still holds this version
    payload_offset: int  # the blob starts here in the shared storage (after the header)
    payload_bytes: int
    storage_size: int
    storage_offset: int
    handle: bytes  # cudaIpcMemHandle of the allocation holding the storage
    ref_counter_handle: bytes  # PyTorch's cross-process reference count (a shared-memory file)
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool

    def to_json(self) -> bytes:
        d = asdict(self)
        for k in ("handle", "ref_counter_handle", "event_handle"):
            d[k] = None if d[k] is None else base64.b64encode(d[k]).decode()
        return document_bytes(DOC_KIND, d)

    @classmethod
    def from_json(cls, data: bytes, version: int) -> IpcDoc:
        """Parse and type-check a handle document; `version` is the manifest's."""
        try:
            d = document_fields(data, DOC_KIND)
            for k in ("handle", "ref_counter_handle", "event_handle"):
                d[k] = None if d.get(k) is None else base64.b64decode(d[k], validate=True)
            doc = cls(**d)
        except (ValueError, TypeError) as e:  # JSONDecodeError, binascii.Error are ValueErrors
            raise WeightError(f"version {version}: unreadable CUDA IPC handle document ({e})") from None
        ints = ("version", "nonce", "payload_offset", "payload_bytes", "storage_size", "storage_offset",
                "ref_counter_offset")  # fmt: skip
        if any(type(getattr(doc, k)) is not int or getattr(doc, k) < 0 for k in ints) or not (
            isinstance(doc.device_uuid, str) and isinstance(doc.handle, bytes)
            and isinstance(doc.ref_counter_handle, bytes) and isinstance(doc.event_sync_required, bool)
        ):  # fmt: skip
            raise WeightError(f"version {version}: malformed CUDA IPC handle document")
        if doc.version != version:
            raise WeightError(f"version {version}: its CUDA IPC handle is for version {doc.version}")
        if doc.payload_offset < HEADER_BYTES or doc.payload_offset + doc.payload_bytes > doc.storage_size:
            raise WeightError(
                f"version {version}: payload {doc.payload_offset}+{doc.payload_bytes} does not fit "
                f"the shared {doc.storage_size}-byte buffer after its {HEADER_BYTES}-byte header"
            )
        return doc


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _header(version: int, nonce: int) -> torch.Tensor:
    return torch.tensor([MAGIC, version, nonce, 0], dtype=torch.int64)


@dataclass
class _Slot:
    buffer: torch.Tensor  # uint8 [HEADER_BYTES + payload bytes] on the trainer's GPU
    version: int = 0  # 0: holds nothing anyone may still read


class IpcExporter:
    """Trainer side: turns a state dict into a colocated version and keeps it alive until confirmed."""

    def __init__(self, max_unconfirmed: int = 2) -> None:
        if max_unconfirmed < 1:
            raise ValueError(f"max_unconfirmed must be at least 1, got {max_unconfirmed}")
        self.max_unconfirmed = max_unconfirmed
        self.confirmed = 0
        self._slots: list[_Slot] = []

    @property
    def held_versions(self) -> list[int]:
        """Versions whose buffers are kept for a receiver (exported, not yet confirmed)."""
        return sorted(s.version for s in self._slots if s.version > self.confirmed)

    def confirm(self, version: int) -> None:
        """Receivers serve `version` (and so no longer need it or anything older): free their buffers."""
        self.confirmed = max(self.confirmed, version)

    def pack(
        self,
        state_dict: dict[str, torch.Tensor],
        version: int,
        fmt: Literal["fp8", "bf16", "int4"] = "fp8",
        int4_targets: str = "auto",
    ) -> tuple[types_pb2.WeightManifest, list[bytes]]:
        """(manifest, [handle document]): a version to push exactly like `packer.pack`'s output."""
        manifest, pieces, total = plan(state_dict, version, fmt, int4_targets)
        if not pieces or pieces[0][1].device.type != "cuda":
            raise WeightError("CUDA IPC weight sync needs the weights on a CUDA device")
        device = pieces[0][1].device
        slot = self._slot(HEADER_BYTES + total, device)
        nonce = secrets.randbits(62)
        # Header first: from here on, a reader of the slot's old version sees it was overwritten.
        slot.buffer[:32].view(torch.int64).copy_(_header(version, nonce))
        fill(pieces, slot.buffer[HEADER_BYTES:])
        torch.cuda.current_stream(device).synchronize()  # the data is in place before anyone hears of it
        slot.version = version
        (_, handle, size, offset, rc_handle, rc_offset, event_handle, event_sync) = (
            slot.buffer.untyped_storage()._share_cuda_()
        )
        doc = IpcDoc(
            version=version, device_uuid=device_uuid(device.index or 0), nonce=nonce,
            payload_offset=HEADER_BYTES, payload_bytes=total, storage_size=size, storage_offset=offset,
            handle=handle, ref_counter_handle=rc_handle, ref_counter_offset=rc_offset,
            event_handle=event_handle, event_sync_required=event_sync,
        ).to_json()  # fmt: skip
        manifest.format = FORMATS[fmt] + IPC_SUFFIX
        manifest.total_bytes = manifest.chunk_bytes = len(doc)
        manifest.chunk_sha256.append(hashlib.sha256(doc).hexdigest())
        return manifest, [doc]

    def _slot(self, nbytes: int, device: torch.device) -> _Slot:
        """A free buffer of `nbytes` (reused, else new); past the bound, the oldest unconfirmed one."""
        self._slots = [s for s in self._slots if s.buffer.numel() == nbytes or s.version > self.confirmed]
        free = [s for s in self._slots if s.version <= self.confirmed and s.buffer.numel() == nbytes]
        if free:
            return free[0]
        if len(self._slots) < self.max_unconfirmed:
            self._slots.append(_Slot(torch.empty(nbytes, dtype=torch.uint8, device=device)))
            return self._slots[-1]
        oldest = min(self._slots, key=lambda s: s.version)
        log.warning(
            "weights version %d was never confirmed by its receivers; reusing its GPU buffer "
            "(a late reader of it is refused)", oldest.version,
        )  # fmt: skip
        if oldest.buffer.numel() != nbytes:
            oldest.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return oldest


def _local_device(doc: IpcDoc) -> int:
    if not torch.cuda.is_available():
        raise WeightError(
            f"version {doc.version}: a CUDA IPC version, but this process has no CUDA device "
            "(colocated sync needs the trainer's GPU here; use the byte path)"
        )
    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == doc.device_uuid:
            return index
    raise WeightError(
        f"version {doc.version}: the sender's GPU {doc.device_uuid} is not visible to this process "
        "(colocated sync needs the trainer's GPU here; use the byte path)"
    )


def _check_header(shared: torch.Tensor, doc: IpcDoc, when: str) -> None:
    magic, version, nonce, _ = shared[:32].view(torch.int64).tolist()
    if magic != MAGIC or version != doc.version or nonce != doc.nonce:
        raise WeightError(
            f"version {doc.version}: the shared buffer was overwritten by the sender {when} it was read "
            f"(it now holds version {version}; a newer version follows)"
        )


def open_payload(doc: IpcDoc, manifest: types_pb2.WeightManifest) -> torch.Tensor:
    """Receiver side: this process's own copy of the version's blob (uint8, on the shared GPU).

    The sender's buffer is only read here, and released before returning."""
    index = _local_device(doc)
    blob_bytes = max((e.offset + e.nbytes for e in manifest.tensors), default=0)
    if doc.payload_bytes != blob_bytes:
        raise WeightError(
            f"version {doc.version}: the shared payload is {doc.payload_bytes} bytes, "
            f"its manifest lays out {blob_bytes}"
        )
    try:
        with torch.cuda.device(index):
            storage = torch.UntypedStorage._new_shared_cuda(
                index, doc.handle, doc.storage_size, doc.storage_offset, doc.ref_counter_handle,
                doc.ref_counter_offset, doc.event_handle, doc.event_sync_required,
            )  # fmt: skip
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightError(
            f"version {doc.version}: its CUDA IPC handle does not open in this process ({reason}); "
            "the sender released it, or it lives in another process tree, host or GPU"
        ) from None
    shared = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(storage)
    if shared.numel() < doc.payload_offset + doc.payload_bytes:
        raise WeightError(f"version {doc.version}: the shared buffer is smaller than its document says")
    _check_header(shared, doc, "before")
    payload = shared[doc.payload_offset : doc.payload_offset + doc.payload_bytes].clone()
    torch.cuda.current_stream(index).synchronize()
    _check_header(shared, doc, "while")
    return payload
