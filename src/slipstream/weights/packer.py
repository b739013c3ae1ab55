"""The weight wire format, writer side: a state dict becomes one manifest plus chunks of one blob.

A weight version travels as a `WeightManifest` followed by `WeightChunk`s (protos: types.proto).
The manifest says everything a receiver needs to check before it trusts a byte: every tensor's
Hugging Face name, shape, wire dtype and byte range in the blob; the sha256 of every chunk; a
fingerprint of the model's (name, shape) set, so weights of another model are refused before
they are staged. The blob is the raw little-endian bytes of the tensors, laid end to end
(safetensors-style, each start aligned to 64 bytes so a reader can view it in place); nothing
is pickled, so a weight stream can never execute code on the receiver.

In the "fp8" format every linear projection and the stacked routed experts of an MoE (see
`quant.should_quantize`) travel as float8_e4m3fn plus a float32 `<name>_scale_inv` entry
(DeepSeek-V3's name and layout; experts [E, out, in] with scales [E, out/128, in/128], each expert
its own blocks); every other floating tensor travels as bf16. In the "int4" format the
`quant.int4_names` weights (by --int4-qat-targets) travel as dtype "int4": the tensor's own shape
in the manifest, its bytes the packed [..., in/2] uint8 of `quant/int4.py` (two values a byte),
plus a float32 `<name>_scale` entry [..., in/128] (block_size 128: the group); every other
floating tensor as bf16. Integer buffers travel unchanged. The coordinator relays the messages
without decoding them; `WeightStager` is the reader. A matrix may also come
quantized already (`Quantized`: under FSDP2 each trainer rank quantizes the rows it holds); it is
laid out exactly as if the packer had quantized it.

How it is fast. `plan` lays the version out; `fill` writes every wire tensor into one flat
buffer on the trainer's device (quantized there, so full-precision weights never cross PCIe; on a
GPU every FP8 matrix of the version in one kernel launch);
`pack` then copies that buffer to pinned host memory in one transfer and cuts it into chunks,
each chunk's bytes and sha256 made on a thread pool (hashlib releases the GIL). The colocated
path (`ipc.py`) shares the same device buffer by CUDA IPC handle instead of copying it out.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from slipstream.kernels import fp8_block
from slipstream.proto import types_pb2
from slipstream.quant import (
    BLOCK,
    GROUP,
    as_block_matrix,
    int4_names,
    packed_shapes,
    quantize_blockwise,
    quantize_int4,
    scale_shape,
    should_quantize,
)

FORMATS = {"fp8": "fp8-block128", "bf16": "bf16", "int4": "int4-group128"}
# A version whose bytes travel another way has one chunk, a document saying where: CUDA IPC
# handles (`ipc.py`, colocated on a GPU) or a shared-memory file (`shm.py`, one host).
# Across hosts: broadcast by torch.distributed to the servers of a weights group (`broadcast.py`).
IPC_SUFFIX, SHM_SUFFIX, BROADCAST_SUFFIX = "+cuda-ipc", "+shm", "+broadcast"
SCALE_SUFFIX = "_scale_inv"  # FP8: w = q * scale_inv (DeepSeek-V3)
INT4_SCALE_SUFFIX = "_scale"  # int4: w = q * scale (compressed-tensors' name)
ALIGN = 64
# 8 MiB: per-message costs (protobuf, gRPC framing, a Python call per chunk on every hop) fall
# away, and a chunk is still far under the mesh's 64 MiB message limit (rpc/server.py).
DEFAULT_CHUNK_BYTES = 8 << 20
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int64": torch.int64,
    "int32": torch.int32,
    "int4": torch.uint8,  # packed two a byte: `wire_nbytes` and `wire_view_shape` say how
}
_WIRE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}
_pool: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class Quantized:
    """A matrix already in its wire form, quantized where its rows were (under FSDP2 each rank
    quantizes the rows it holds, `trainer.parallel.wire_state`): `values` as they travel
    (float8_e4m3fn [..., out, in], or int4's packed uint8 [..., in/2]) and their float32 scales.
    The packer lays it out as it would have quantized the full-precision matrix itself."""

    values: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size  # the matrix's own (logical) shape
    dtype: str  # its wire dtype: "float8_e4m3fn" or "int4"

    @property
    def device(self) -> torch.device:
        return self.values.device

    def detach(self) -> Quantized:
        return self


class WeightError(ValueError):
    """A weight version that cannot be packed or must not be applied; the message says why."""


def hash_pool() -> ThreadPoolExecutor:
    """Threads for sha256 over chunks, one per core this process may run on (hashlib drops the
    GIL): the trainer hashes each chunk once, each rollout server checks each chunk once."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix="sha256")
    return _pool


def by_reference(fmt: str) -> bool:
    """Whether a manifest's format names a version whose one chunk is a document, not bytes."""
    return fmt.endswith((IPC_SUFFIX, SHM_SUFFIX, BROADCAST_SUFFIX))


def model_fingerprint(named_shapes: Iterable[tuple[str, Sequence[int]]]) -> str:
    """sha256 of the sorted (name, shape) pairs: equal for the same architecture, in any order."""
    lines = sorted(f"{name}:{','.join(str(int(d)) for d in shape)}" for name, shape in named_shapes)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def wire_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of an entry of wire dtype `dtype` and (logical) `shape`."""
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel // 2 if dtype == "int4" else numel * WIRE_DTYPES[dtype].itemsize


def wire_view_shape(dtype: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape an entry's bytes are viewed as: int4's packed [..., in/2], else `shape`."""
    shape = tuple(int(d) for d in shape)
    return packed_shapes(shape)[0] if dtype == "int4" else shape


def _wire(name: str, t: torch.Tensor, fmt: str, int4: set[str]) -> tuple[str, torch.Tensor, str]:
    """(wire dtype, tensor as it travels, scale entry name or "") for one state-dict tensor. A
    quantized matrix (FP8, int4) is listed as the matrix itself: `fill` quantizes it into the blob
    (or, one quantized already, copies its values and scales)."""
    if isinstance(t, Quantized):
        wanted = wire_dtype(name, t.shape, fmt, int4)  # what the full-precision matrix travels as
        if t.dtype != wanted:
            raise WeightError(f"{name}: quantized as {t.dtype}, but the {fmt} format sends it as {wanted}")
        return t.dtype, t, name + (INT4_SCALE_SUFFIX if t.dtype == "int4" else SCALE_SUFFIX)
    if fmt == "fp8" and should_quantize(name, t):
        return "float8_e4m3fn", t, name + SCALE_SUFFIX
    if fmt == "int4" and name in int4:
        return "int4", t, name + INT4_SCALE_SUFFIX
    if t.is_floating_point():
        return "bfloat16", t.to(torch.bfloat16), ""
    if t.dtype in _WIRE_NAMES:
        return _WIRE_NAMES[t.dtype], t, ""
    raise WeightError(f"{name}: dtype {t.dtype} has no wire encoding (floating or int32/int64 only)")


def wire_dtype(name: str, shape: Sequence[int], fmt: str, int4: set[str]) -> str:
    """The wire dtype a floating tensor `name` of `shape` travels as in format `fmt` (`int4`: the
    format's int4 names, `quant.int4_names`)."""
    return _wire(name, torch.empty(tuple(shape), device="meta"), fmt, int4)[0]


def weights_to_sync(
    state_dict: dict[str, torch.Tensor], tie_word_embeddings: bool
) -> dict[str, torch.Tensor]:
    """The tensors a version carries: all of them, less a tied LM head (it *is* the embedding).

    For Qwen3-0.6B the tied head is 156 M parameters, 29% of an FP8 version; the receiving
    model re-ties it. Trainer and rollout server both call this, so the manifest's names and
    the stager's expected names agree.
    """
    if tie_word_embeddings:
        return {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    return dict(state_dict)


def plan(
    state_dict: dict[str, torch.Tensor],
    version: int,
    fmt: Literal["fp8", "bf16", "int4"],
    int4_targets: str = "auto",
) -> tuple[types_pb2.WeightManifest, list[tuple[int, torch.Tensor, int, str]], int]:
    """Lay a version out: (manifest with its tensor entries, pieces, blob bytes).

    A piece is (offset, tensor, scale offset, wire dtype): with scale offset -1 the tensor's bytes
    go at the offset as they are (already in their wire dtype, made where the weights are);
    otherwise the tensor is a matrix that `fill` quantizes (FP8 or int4) at the offset, its scales
    at the scale offset. `int4_targets` (--int4-qat-targets) picks the int4 weights of the int4
    format. The manifest's chunk fields are left for the transport (`pack`, or `ipc.IpcExporter`)."""
    if fmt not in FORMATS:
        raise WeightError(f"unknown weight format {fmt!r} (expected one of {sorted(FORMATS)})")
    manifest = types_pb2.WeightManifest(
        version=version,
        format=FORMATS[fmt],
        model_fingerprint=model_fingerprint((n, t.shape) for n, t in state_dict.items()),
    )
    int4 = int4_names(((n, t.shape) for n, t in state_dict.items()), int4_targets) if fmt == "int4" else set()
    pieces: list[tuple[int, torch.Tensor, int, str]] = []
    offset = 0

    def add(name: str, shape, dtype: str, scale_name: str = "", block: int = 0) -> int:
        nonlocal offset
        at = offset
        nbytes = wire_nbytes(dtype, shape)
        manifest.tensors.append(
            types_pb2.TensorEntry(
                name=name, shape=list(shape), dtype=dtype, offset=at, nbytes=nbytes,
                scale_name=scale_name, block_size=block,
            )
        )  # fmt: skip
        offset += -(-nbytes // ALIGN) * ALIGN
        return at

    for name, tensor in state_dict.items():
        dtype, t, scale_name = _wire(name, tensor.detach(), fmt, int4)
        if not scale_name:
            pieces.append((add(name, t.shape, dtype), t, -1, dtype))
            continue
        if scale_name in state_dict:
            raise WeightError(f"{scale_name}: the scale entry of {name} collides with a model tensor")
        block = GROUP if dtype == "int4" else BLOCK
        q_at = add(name, t.shape, dtype, scale_name, block)
        sshape = packed_shapes(t.shape)[1] if dtype == "int4" else scale_shape(tuple(t.shape))
        pieces.append((q_at, t, add(scale_name, sshape, "float32"), dtype))
    total = manifest.tensors[-1].offset + manifest.tensors[-1].nbytes if manifest.tensors else 0
    return manifest, pieces, total


def fill(pieces: list[tuple[int, torch.Tensor, int, str]], out: torch.Tensor) -> torch.Tensor:
    """Write each piece at its offset in `out` (flat uint8; padding zeroed), quantizing the FP8 and
    int4 ones: on a GPU all FP8 matrices in one launch (`kernels.fp8_block.quantize_many`), else
    one by one (int4 always one by one, with `quant.quantize_int4` where the weights are)."""
    out.zero_()  # the alignment gaps are hashed too: make them deterministic
    matrices = []
    for off, t, scale_off, dtype in pieces:
        if isinstance(t, Quantized):
            _put(out, off, t.values)
            _put(out, scale_off, t.scales)
        elif dtype == "int4":
            packed, scales = quantize_int4(t)
            _put(out, off, packed)
            _put(out, scale_off, scales)
        elif scale_off >= 0:
            matrices.append((t, off, scale_off))
        else:
            _put(out, off, t)
    if matrices and fp8_block.many_available(out) and len({t.dtype for t, _, _ in matrices}) == 1:
        # Stacked experts go in as one [E*out, in] matrix where that is their blocks exactly
        # (`as_block_matrix`: the same bytes at the same offsets); any other one by one below.
        flat = [(as_block_matrix(t), off, scale_off) for t, off, scale_off in matrices]
        fp8_block.quantize_many(out, [job for job in flat if job[0] is not None])
        matrices = [m for m, (f, _, _) in zip(matrices, flat, strict=True) if f is None]
    for t, off, scale_off in matrices:
        q, scale_inv = quantize_blockwise(t)
        _put(out, off, q)
        _put(out, scale_off, scale_inv)
    return out


def _put(out: torch.Tensor, offset: int, t: torch.Tensor) -> None:
    """t's bytes at `offset` of the flat uint8 `out`."""
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    out[offset : offset + raw.numel()].copy_(raw)


def _device_of(pieces: list[tuple[int, torch.Tensor, int, str]]) -> torch.device:
    return pieces[0][1].device if pieces else torch.device("cpu")


def _cut(view: memoryview, start: int, end: int) -> tuple[bytes, str]:
    data = view[start:end].tobytes()
    return data, hashlib.sha256(data).hexdigest()


def chunk_hashes(view: memoryview, chunk_bytes: int) -> list[str]:
    """The sha256 of each `chunk_bytes` slice of `view`, on all cores, without copying."""
    starts = range(0, len(view), chunk_bytes)
    return list(hash_pool().map(lambda i: hashlib.sha256(view[i : i + chunk_bytes]).hexdigest(), starts))


def document_bytes(kind: str, fields: dict) -> bytes:
    """The one chunk of a version by reference: a JSON document of `fields`, tagged with its kind."""
    return json.dumps({"kind": kind, **fields}, sort_keys=True).encode()


def document_fields(data: bytes, kind: str) -> dict:
    """The fields of a `document_bytes` document of `kind`; ValueError if `data` is not one."""
    d = json.loads(data)
    if not isinstance(d, dict) or d.pop("kind", None) != kind:
        raise ValueError(f"not a {kind} document")
    return d


def check_chunk_list(version: int, payload_bytes: int, chunk_bytes: int, hashes: object) -> None:
    """A document's chunk list (a version by reference lists its payload's chunk hashes) is
    well formed: one sha256 hex string per `chunk_bytes` of the payload."""
    if (
        type(chunk_bytes) is not int
        or chunk_bytes <= 0
        or type(payload_bytes) is not int
        or payload_bytes < 0
    ):
        raise WeightError(
            f"version {version}: bad sizes payload_bytes={payload_bytes} chunk_bytes={chunk_bytes}"
        )
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        raise WeightError(f"version {version}: the chunk hashes are not a list of strings")
    if len(hashes) != -(-payload_bytes // chunk_bytes):
        raise WeightError(
            f"version {version}: {len(hashes)} chunk hashes for {payload_bytes} bytes in chunks of {chunk_bytes}"
        )


def verify_chunks(version: int, view: memoryview, chunk_bytes: int, hashes: list[str], where: str) -> None:
    """Every chunk of `view` has its listed sha256 (checked on all cores), else `WeightError`."""
    for index, (got, want) in enumerate(zip(chunk_hashes(view, chunk_bytes), hashes, strict=True)):
        if got != want:
            raise WeightError(f"version {version}: chunk {index} of {where} fails its sha256 check")


def pack(
    state_dict: dict[str, torch.Tensor],
    version: int,
    fmt: Literal["fp8", "bf16", "int4"] = "fp8",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    int4_targets: str = "auto",
) -> tuple[types_pb2.WeightManifest, list[bytes]]:
    """Encode `state_dict` as weight version `version`: (manifest, chunks of the blob, in order)."""
    if chunk_bytes <= 0:
        raise WeightError(f"chunk_bytes must be positive, got {chunk_bytes}")
    manifest, pieces, total = plan(state_dict, version, fmt, int4_targets)
    manifest.chunk_bytes = chunk_bytes
    manifest.total_bytes = total

    # One flat buffer on the weights' device, then (on a GPU) one copy into pinned host memory.
    device = _device_of(pieces)
    blob = fill(pieces, torch.empty(total, dtype=torch.uint8, device=device))
    if device.type == "cuda":
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        host.copy_(blob)
        blob = host
    view = memoryview(blob.numpy()) if total else memoryview(b"")
    cuts = hash_pool().map(lambda i: _cut(view, i, min(i + chunk_bytes, total)), range(0, total, chunk_bytes))
    chunks: list[bytes] = []
    for data, digest in cuts:
        chunks.append(data)
        manifest.chunk_sha256.append(digest)
    return manifest, chunks


def iter_messages(
    manifest: types_pb2.WeightManifest, chunks: Sequence[bytes]
) -> Iterator[types_pb2.WeightMessage]:
    """The messages of one weight stream: the manifest first, then the chunks in order."""
    yield types_pb2.WeightMessage(manifest=manifest)
    for index, data in enumerate(chunks):
        # Fields set in place: `WeightMessage(chunk=WeightChunk(data=...))` costs ~20 ms per 8 MiB
        # chunk with protobuf's upb backend (measured: 0.37 GB/s, the trainer's whole push hop
        # was bound by it), setting them costs one copy (~0.3 ms).
        msg = types_pb2.WeightMessage()
        msg.chunk.version = manifest.version
        msg.chunk.index = index
        msg.chunk.data = data
        yield msg
