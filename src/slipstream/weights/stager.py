"""The weight wire format, reader side: stage one version completely, verify it, then hand it over.

A rollout server must never run on half a version or on someone else's weights, and a bad
version must leave the old one serving. So the stager checks the manifest against the model it
serves before allocating anything (version strictly newer, same fingerprint, exactly the
expected names and shapes, consistent dtypes, byte ranges and FP8 scale references), checks each
chunk as it arrives (version, order, length, sha256) while copying it into one preallocated
blob, and only `finish()` — once every chunk is in — turns the blob into tensors. Any failure
raises `WeightError` naming what is wrong; the caller drops the stager and keeps its weights.

One stager stages one version: the rollout server makes a fresh one for every FetchWeights
stream, and after a successful `finish()` its `current_version` is the version just staged.
"""

from __future__ import annotations

import hashlib

import torch

from slipstream.proto import types_pb2
from slipstream.quant import BLOCK, FP8_DTYPE, dequantize_blockwise, scale_shape
from slipstream.weights.packer import ALIGN, FORMATS, WIRE_DTYPES, WeightError, model_fingerprint


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class WeightStager:
    def __init__(self, expected_shapes: dict[str, tuple[int, ...]], current_version: int):
        self.expected_shapes = {name: tuple(int(d) for d in shape) for name, shape in expected_shapes.items()}
        self.current_version = current_version
        self._fingerprint = model_fingerprint(self.expected_shapes.items())
        self._manifest: types_pb2.WeightManifest | None = None
        self._blob: bytearray | None = None
        self._next_chunk = 0
        self._done = False

    def add(self, msg: types_pb2.WeightMessage) -> None:
        """Take the next message of the stream: the manifest, then its chunks in order."""
        if self._done:
            raise WeightError("this stager already finished a version; use a new one")
        kind = msg.WhichOneof("kind")
        if kind == "manifest":
            self._begin(msg.manifest)
        elif kind == "chunk":
            self._take(msg.chunk)
        else:
            raise WeightError("empty WeightMessage (neither manifest nor chunk)")

    def finish(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, float32 tensors by Hugging Face name; integer buffers keep their dtype)."""
        m = self._manifest
        if m is None:
            raise WeightError("no manifest received")
        if self._done:
            raise WeightError(f"version {m.version} was already finished")
        num_chunks = len(m.chunk_sha256)
        if self._next_chunk != num_chunks:
            raise WeightError(
                f"version {m.version}: missing chunks {self._next_chunk}..{num_chunks - 1} of {num_chunks}"
            )
        entries = {e.name: e for e in m.tensors}
        scale_names = {e.scale_name for e in m.tensors if e.scale_name}
        out: dict[str, torch.Tensor] = {}
        for e in m.tensors:
            if e.name in scale_names:
                continue
            t = self._view(e)
            if e.scale_name:
                out[e.name] = dequantize_blockwise(t, self._view(entries[e.scale_name]))
            elif t.is_floating_point():
                out[e.name] = t.to(torch.float32, copy=True)
            else:
                out[e.name] = t.clone()
        self._blob = None
        self._done = True
        self.current_version = m.version
        return m.version, out

    # ---- internals ------------------------------------------------------------------------

    def _view(self, e: types_pb2.TensorEntry) -> torch.Tensor:
        """The entry's bytes in the blob, viewed as its wire dtype and shape (no copy)."""
        shape = tuple(e.shape)
        dtype = WIRE_DTYPES[e.dtype]
        numel = _numel(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._blob, dtype=dtype, count=numel, offset=e.offset).view(shape)

    def _begin(self, m: types_pb2.WeightManifest) -> None:
        if self._manifest is not None:
            raise WeightError(
                f"second manifest (version {m.version}) while version {self._manifest.version} is staging"
            )
        _check_manifest(m, self.current_version, self._fingerprint, self.expected_shapes)
        self._manifest = m
        self._blob = bytearray(m.total_bytes)

    def _take(self, c: types_pb2.WeightChunk) -> None:
        m = self._manifest
        if m is None:
            raise WeightError(f"chunk {c.index} of version {c.version} arrived before any manifest")
        if c.version != m.version:
            raise WeightError(f"chunk {c.index} belongs to version {c.version}, staging version {m.version}")
        if c.index != self._next_chunk:
            raise WeightError(
                f"version {m.version}: chunk {c.index} arrived, expected chunk {self._next_chunk}"
            )
        if c.index >= len(m.chunk_sha256):
            raise WeightError(f"version {m.version}: chunk {c.index} beyond the {len(m.chunk_sha256)} listed")
        start = c.index * m.chunk_bytes
        expected_len = min(m.chunk_bytes, m.total_bytes - start)
        if len(c.data) != expected_len:
            raise WeightError(
                f"version {m.version}: chunk {c.index} has {len(c.data)} bytes, expected {expected_len} "
                f"(total {m.total_bytes} in chunks of {m.chunk_bytes})"
            )
        digest = hashlib.sha256(c.data).hexdigest()
        if digest != m.chunk_sha256[c.index]:
            raise WeightError(f"version {m.version}: chunk {c.index} fails its sha256 check")
        memoryview(self._blob)[start : start + expected_len] = c.data
        self._next_chunk += 1


def _check_manifest(
    m: types_pb2.WeightManifest,
    current_version: int,
    fingerprint: str,
    expected_shapes: dict[str, tuple[int, ...]],
) -> None:
    """Raise WeightError unless `m` is a newer, self-consistent version of the expected model."""
    v = m.version
    if v <= current_version:
        raise WeightError(f"version {v} is not newer than the current version {current_version}")
    if m.format not in FORMATS.values():
        raise WeightError(f"version {v}: unknown format {m.format!r}")
    if m.total_bytes < 0 or m.chunk_bytes <= 0:
        raise WeightError(f"version {v}: bad sizes total_bytes={m.total_bytes} chunk_bytes={m.chunk_bytes}")
    num_chunks = -(-m.total_bytes // m.chunk_bytes)
    if len(m.chunk_sha256) != num_chunks:
        raise WeightError(
            f"version {v}: {len(m.chunk_sha256)} chunk hashes listed, but {m.total_bytes} bytes "
            f"in chunks of {m.chunk_bytes} make {num_chunks}"
        )

    entries: dict[str, types_pb2.TensorEntry] = {}
    for e in m.tensors:
        if e.name in entries:
            raise WeightError(f"version {v}: tensor {e.name} listed twice")
        entries[e.name] = e
        if e.dtype not in WIRE_DTYPES:
            raise WeightError(f"version {v}: {e.name} has unknown wire dtype {e.dtype!r}")
        if any(d < 0 for d in e.shape):
            raise WeightError(f"version {v}: {e.name} has a negative dimension {list(e.shape)}")
        itemsize = torch.empty((), dtype=WIRE_DTYPES[e.dtype]).element_size()
        if e.nbytes != _numel(e.shape) * itemsize:
            raise WeightError(
                f"version {v}: {e.name} is {e.nbytes} bytes, its shape and dtype need "
                f"{_numel(e.shape) * itemsize}"
            )
        if e.offset < 0 or e.offset + e.nbytes > m.total_bytes:
            raise WeightError(
                f"version {v}: {e.name} spans bytes {e.offset}..{e.offset + e.nbytes}, "
                f"outside the {m.total_bytes}-byte blob"
            )
        if e.offset % itemsize:
            raise WeightError(f"version {v}: {e.name} starts at offset {e.offset}, not aligned to {itemsize}")

    scale_names: set[str] = set()
    for e in m.tensors:
        is_fp8 = WIRE_DTYPES[e.dtype] == FP8_DTYPE
        if is_fp8 != bool(e.scale_name):
            raise WeightError(f"version {v}: {e.name} ({e.dtype}) must have a scale entry iff it is FP8")
        if not is_fp8:
            continue
        if m.format != FORMATS["fp8"]:
            raise WeightError(f"version {v}: FP8 tensor {e.name} in a {m.format!r} version")
        scale = entries.get(e.scale_name)
        if len(e.shape) != 2 or e.block_size != BLOCK or scale is None:
            raise WeightError(
                f"version {v}: FP8 tensor {e.name} needs 2 dims, block_size {BLOCK} and a listed scale "
                f"entry (has shape {list(e.shape)}, block_size {e.block_size}, scale {e.scale_name!r})"
            )
        if scale.dtype != "float32" or tuple(scale.shape) != scale_shape(tuple(e.shape)):
            raise WeightError(
                f"version {v}: scale {scale.name} of {e.name} is {scale.dtype} {list(scale.shape)}, "
                f"expected float32 {list(scale_shape(tuple(e.shape)))}"
            )
        scale_names.add(e.scale_name)

    # The blob is the entries laid end to end (64-byte aligned): a larger total is padding nobody
    # reads, and would let a manifest make this process allocate whatever it claims.
    laid_out = sum(-(-e.nbytes // ALIGN) * ALIGN for e in m.tensors)
    if m.total_bytes > laid_out:
        raise WeightError(f"version {v}: total_bytes {m.total_bytes} exceeds its tensors' {laid_out} bytes")

    model = {name: tuple(e.shape) for name, e in entries.items() if name not in scale_names}
    missing = sorted(expected_shapes.keys() - model.keys())
    unexpected = sorted(model.keys() - expected_shapes.keys())
    if missing or unexpected:
        raise WeightError(
            f"version {v}: tensor names differ: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong = [(n, list(s), list(expected_shapes[n])) for n, s in model.items() if s != expected_shapes[n]]
    if wrong:
        n, got, want = wrong[0]
        raise WeightError(f"version {v}: {n} has shape {got}, expected {want} ({len(wrong)} tensors differ)")
    # Names and shapes above give the precise complaint; the fingerprint also catches a manifest
    # whose entries look right but that was written for another model.
    if m.model_fingerprint != fingerprint:
        raise WeightError(
            f"version {v}: model fingerprint {m.model_fingerprint[:12]}… does not match "
            f"this model's {fingerprint[:12]}… (weights of another architecture?)"
        )
