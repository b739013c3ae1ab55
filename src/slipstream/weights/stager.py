"""The weight wire format, reader side: stage one version completely, verify it, then hand it over.

A rollout server must never run on half a version or on someone else's weights, and a bad
version must leave the old one serving. So the stager checks the manifest against the model it
serves before allocating anything (version strictly newer, same fingerprint, exactly the
expected names and shapes, consistent dtypes, byte ranges and FP8 / int4 scale references), checks each
chunk as it arrives (version, order, length, sha256) while copying it into one preallocated
blob, and only `finish()` — once every chunk is in — turns the blob into tensors. Any failure
raises `WeightError` naming what is wrong; the caller drops the stager and keeps its weights.

One stager stages one version: the rollout server makes a fresh one for every FetchWeights
stream, and after a successful `finish()` its `current_version` is the version just staged.

Speed. Chunk hashes run on a thread pool while later chunks arrive (at most `_WINDOW` in
flight; a bad one is reported at the next `add` that finds it done, at the latest by `finish`,
and nothing is decoded before all have passed). With `device="cuda"` the blob is staged in
pinned memory, crosses to the GPU in one copy and is dequantized there, every FP8 matrix in one
kernel launch; tensors already in the wanted dtype are views of the staged blob, not copies.

A version by reference is the same manifest with one chunk, a JSON document saying where the
bytes are. Colocated (format "<fmt>+cuda-ipc", `ipc.py`): the CUDA IPC handle of the sender's
device buffer; `finish()` copies the payload into this process's own GPU memory. On one host
("<fmt>+shm", `shm.py`): a shared-memory file; `finish()` maps it read-only and checks each
chunk's sha256 (listed in the document) on all cores. Across hosts ("<fmt>+broadcast",
`broadcast.py`): the trainer's weights group; `finish()` joins it through `receiver` and receives
the blob by torch.distributed broadcast, then checks it the same way. Either blob is decoded exactly like the
byte path's; from a shared-memory file, tensors already in `dtype` are read-only views of it (the
engine copies them into its parameters).
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future

import torch

from slipstream.kernels import fp8_block
from slipstream.proto import types_pb2
from slipstream.quant import (
    BLOCK,
    GROUP,
    block_matrix_shape,
    dequantize_blockwise,
    dequantize_int4,
    packed_shapes,
    scale_shape,
)
from slipstream.weights import broadcast, ipc, shm
from slipstream.weights.packer import (
    ALIGN,
    BROADCAST_SUFFIX,
    FORMATS,
    IPC_SUFFIX,
    SHM_SUFFIX,
    WIRE_DTYPES,
    WeightError,
    by_reference,
    hash_pool,
    model_fingerprint,
    wire_nbytes,
    wire_view_shape,
)

_MANY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what dequantize_many writes
_WINDOW = 16  # chunk hashes in flight: bounds the chunks held only for their pending check
# A version by reference: its format's suffix -> the most bytes its one document chunk may have.
_MAX_DOC_BYTES = {
    IPC_SUFFIX: ipc.MAX_DOC_BYTES,
    SHM_SUFFIX: shm.MAX_DOC_BYTES,
    BROADCAST_SUFFIX: broadcast.MAX_DOC_BYTES,
}


def _base_format(fmt: str) -> str:
    """The byte layout's format name of a manifest format (its transport suffix removed)."""
    return next((fmt.removesuffix(x) for x in _MAX_DOC_BYTES if fmt.endswith(x)), fmt)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class WeightStager:
    def __init__(
        self,
        expected_shapes: dict[str, tuple[int, ...]],
        current_version: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        keep_int4: bool = False,
        keep_fp8: bool = False,
        receiver: broadcast.BroadcastReceiver | None = None,
    ):
        """`device`: where the byte path decodes (default: the host); a colocated (CUDA IPC)
        version always decodes on the sender's GPU. `dtype`: of the floating tensors returned.
        `keep_int4`: hand int4 tensors over as they travel (the packed uint8 under the tensor's
        name, its fp32 scales under the scale entry's), for an engine that serves W4A16; else
        they are dequantized to `dtype` like FP8 ones. `keep_fp8`: the same for FP8 matrices (e4m3
        under the name, the block scales under `<name>_scale_inv`), for an engine with FP8 layers;
        FP8 stacked experts are dequantized all the same (`_keeps`).
        `receiver`: this server's membership in the trainer's weights group, for a broadcast version."""
        self.expected_shapes = {name: tuple(int(d) for d in shape) for name, shape in expected_shapes.items()}
        self.current_version = current_version
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.keep_int4, self.keep_fp8 = keep_int4, keep_fp8
        self.receiver = receiver
        self._fingerprint = model_fingerprint(self.expected_shapes.items())
        self._manifest: types_pb2.WeightManifest | None = None
        self._reference = ""  # the suffix of a version by reference ('' for bytes)
        self._blob: torch.Tensor | None = None
        self._doc = b""
        self._hashes: deque[tuple[int, Future]] = deque()
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

    @property
    def format(self) -> str:
        """The staged version's wire format (e.g. `fp8-block128`, `bf16+cuda-ipc`); '' before its manifest."""
        return self._manifest.format if self._manifest is not None else ""

    def finish(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, floating tensors in `dtype` by Hugging Face name; integer buffers keep theirs)."""
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
        self._check_hashes(wait=True)
        if self._reference == IPC_SUFFIX:
            blob = ipc.open_payload(ipc.IpcDoc.from_json(self._doc, m.version), m)
        else:
            if self._reference == SHM_SUFFIX:
                self._blob = shm.open_payload(shm.ShmDoc.from_json(self._doc, m.version), m)
            elif self._reference == BROADCAST_SUFFIX:
                if self.receiver is None:
                    raise WeightError(
                        f"version {m.version}: a broadcast version, but this process is in no weights group"
                    )
                self._blob = self.receiver.receive(broadcast.BroadcastDoc.from_json(self._doc, m.version), m)
            if self.device.type != "cuda":
                blob = self._blob
            elif self._reference == SHM_SUFFIX:
                blob = shm.to_device(self._blob, self.device)  # page-locked for the copy when it can be
            else:
                blob = self._blob.to(self.device, non_blocking=True)
        entries = {e.name: e for e in m.tensors}
        scale_names = {e.scale_name for e in m.tensors if e.scale_name}
        fp8 = [e for e in m.tensors if e.dtype == "float8_e4m3fn" and not self._keeps(e)]
        out: dict[str, torch.Tensor] = {}
        if fp8 and fp8_block.many_available(blob) and self.dtype in _MANY_DTYPES:
            # On a GPU: every FP8 matrix of the version in one launch, into one buffer (stacked
            # experts as one [E*out, in] matrix where that is their blocks exactly, else below).
            flat = [(e, shape) for e in fp8 if (shape := block_matrix_shape(tuple(e.shape)))]
            specs = [(e.offset, entries[e.scale_name].offset, shape) for e, shape in flat]
            matrices = fp8_block.dequantize_many(blob, specs, self.dtype)
            out.update((e.name, w.view(tuple(e.shape))) for (e, _), w in zip(flat, matrices, strict=True))
        for e in m.tensors:
            if e.name in scale_names or e.name in out:
                continue
            t = _view(blob, e)
            if e.scale_name and self._keeps(e):  # as it travels: values and scales, for quantized layers
                out[e.name], out[e.scale_name] = t, _view(blob, entries[e.scale_name])
            elif e.dtype == "int4":
                out[e.name] = dequantize_int4(t, _view(blob, entries[e.scale_name]), self.dtype)
            elif e.scale_name:
                out[e.name] = dequantize_blockwise(t, _view(blob, entries[e.scale_name]), self.dtype)
            elif t.is_floating_point():
                # The blob is this stager's own memory (or a read-only shared file): a tensor already
                # in `dtype` is handed out as a view of it, no copy (the engine copies it in).
                out[e.name] = t.to(self.dtype)
            else:
                out[e.name] = t.clone()
        self._blob = None
        self._done = True
        self.current_version = m.version
        return m.version, out

    def _keeps(self, e: types_pb2.TensorEntry) -> bool:
        """Whether the quantized entry `e` is handed over as it travels (else dequantized). FP8
        ones only as [out, in] matrices, what an `Fp8Linear` takes: stacked experts [E, out, in]
        are always dequantized, for there is no FP8 grouped expert GEMM to take their blocks."""
        if e.dtype == "int4":
            return self.keep_int4
        return self.keep_fp8 and e.dtype == "float8_e4m3fn" and len(e.shape) == 2

    # ---- internals ------------------------------------------------------------------------

    def _begin(self, m: types_pb2.WeightManifest) -> None:
        if self._manifest is not None:
            raise WeightError(
                f"second manifest (version {m.version}) while version {self._manifest.version} is staging"
            )
        _check_manifest(m, self.current_version, self._fingerprint, self.expected_shapes)
        self._manifest = m
        self._reference = next((x for x in _MAX_DOC_BYTES if m.format.endswith(x)), "")
        if not self._reference:
            pin = self.device.type == "cuda" and torch.cuda.is_available()
            self._blob = torch.empty(m.total_bytes, dtype=torch.uint8, pin_memory=pin)

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
        data = c.data  # each access copies the bytes out of the message: once
        if len(data) != expected_len:
            raise WeightError(
                f"version {m.version}: chunk {c.index} has {len(data)} bytes, expected {expected_len} "
                f"(total {m.total_bytes} in chunks of {m.chunk_bytes})"
            )
        self._hashes.append((c.index, hash_pool().submit(_sha256, data)))
        if self._reference:
            self._doc = data
        elif expected_len:
            memoryview(self._blob.numpy())[start : start + expected_len] = data
        self._next_chunk += 1
        self._check_hashes()

    def _check_hashes(self, wait: bool = False) -> None:
        """Compare finished chunk hashes in order, waiting while more than `_WINDOW` are in
        flight; with `wait`, until all are done."""
        m = self._manifest
        while self._hashes and (wait or len(self._hashes) > _WINDOW or self._hashes[0][1].done()):
            index, future = self._hashes.popleft()
            if future.result() != m.chunk_sha256[index]:
                self._hashes.clear()
                raise WeightError(f"version {m.version}: chunk {index} fails its sha256 check")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _view(blob: torch.Tensor, e: types_pb2.TensorEntry) -> torch.Tensor:
    """The entry's bytes in the (uint8) blob, viewed as its wire dtype and shape (no copy; int4
    as its packed uint8 [..., in/2])."""
    shape = wire_view_shape(e.dtype, e.shape)
    dtype = WIRE_DTYPES[e.dtype]
    if _numel(shape) == 0:
        return torch.empty(shape, dtype=dtype, device=blob.device)
    return blob[e.offset : e.offset + e.nbytes].view(dtype).view(shape)


def _check_manifest(
    m: types_pb2.WeightManifest,
    current_version: int,
    fingerprint: str,
    expected_shapes: dict[str, tuple[int, ...]],
) -> None:
    """Raise WeightError unless `m` is a newer, self-consistent version of the expected model."""
    if m.version <= current_version:
        raise WeightError(f"version {m.version} is not newer than the current version {current_version}")
    blob_bytes = _check_chunks(m)
    entries = _check_entries(m, blob_bytes)
    scale_names = _check_scales(m, entries)
    # The blob is the entries laid end to end (64-byte aligned): a larger total is padding nobody
    # reads, and would let a manifest make this process allocate whatever it claims.
    laid_out = sum(-(-e.nbytes // ALIGN) * ALIGN for e in m.tensors)
    if blob_bytes > laid_out:
        raise WeightError(
            f"version {m.version}: total_bytes {blob_bytes} exceeds its tensors' {laid_out} bytes"
        )
    _check_model(m, entries, scale_names, fingerprint, expected_shapes)


def _check_chunks(m: types_pb2.WeightManifest) -> int:
    """Format, sizes and chunk hashes; returns the size of the blob the tensors lie in."""
    v = m.version
    reference = by_reference(m.format)
    base_format = _base_format(m.format)
    if base_format not in FORMATS.values():
        raise WeightError(f"version {v}: unknown format {m.format!r}")
    if m.total_bytes < 0 or m.chunk_bytes <= 0:
        raise WeightError(f"version {v}: bad sizes total_bytes={m.total_bytes} chunk_bytes={m.chunk_bytes}")
    num_chunks = -(-m.total_bytes // m.chunk_bytes)
    if len(m.chunk_sha256) != num_chunks:
        raise WeightError(
            f"version {v}: {len(m.chunk_sha256)} chunk hashes listed, but {m.total_bytes} bytes "
            f"in chunks of {m.chunk_bytes} make {num_chunks}"
        )
    max_doc = next((n for x, n in _MAX_DOC_BYTES.items() if m.format.endswith(x)), 0)
    if reference and (num_chunks != 1 or m.total_bytes > max_doc):
        raise WeightError(
            f"version {v}: a {m.format} version is one chunk of at most {max_doc} bytes "
            f"(its document), got {num_chunks} chunks and {m.total_bytes} bytes"
        )
    # The tensors' byte ranges are in the blob: the chunks' bytes, or for a version by reference
    # the sender's buffer or file, whose size is what its entries lay out (checked when opened).
    blob_bytes = m.total_bytes
    if reference:
        blob_bytes = max((e.offset + e.nbytes for e in m.tensors), default=0)
    return blob_bytes


def _check_entries(m: types_pb2.WeightManifest, blob_bytes: int) -> dict[str, types_pb2.TensorEntry]:
    """Each tensor entry: unique, a known dtype, its bytes matching its shape, inside the blob."""
    v = m.version
    entries: dict[str, types_pb2.TensorEntry] = {}
    for e in m.tensors:
        if e.name in entries:
            raise WeightError(f"version {v}: tensor {e.name} listed twice")
        entries[e.name] = e
        if e.dtype not in WIRE_DTYPES:
            raise WeightError(f"version {v}: {e.name} has unknown wire dtype {e.dtype!r}")
        if any(d < 0 for d in e.shape):
            raise WeightError(f"version {v}: {e.name} has a negative dimension {list(e.shape)}")
        itemsize = WIRE_DTYPES[e.dtype].itemsize
        if e.dtype == "int4" and (len(e.shape) < 2 or e.shape[-1] % GROUP):
            raise WeightError(
                f"version {v}: int4 tensor {e.name} needs [..., out, in] with in a multiple of {GROUP}, "
                f"has shape {list(e.shape)}"
            )
        if e.nbytes != wire_nbytes(e.dtype, e.shape):
            raise WeightError(
                f"version {v}: {e.name} is {e.nbytes} bytes, its shape and dtype need "
                f"{wire_nbytes(e.dtype, e.shape)}"
            )
        if e.offset < 0 or e.offset + e.nbytes > blob_bytes:
            raise WeightError(
                f"version {v}: {e.name} spans bytes {e.offset}..{e.offset + e.nbytes}, "
                f"outside the {blob_bytes}-byte blob"
            )
        if e.offset % itemsize:
            raise WeightError(f"version {v}: {e.name} starts at offset {e.offset}, not aligned to {itemsize}")
    return entries


def _check_scales(m: types_pb2.WeightManifest, entries: dict[str, types_pb2.TensorEntry]) -> set[str]:
    """Every quantized tensor (FP8 in an fp8 version, int4 in an int4 one) has its scale entry of
    the right shape, and only those do; returns the scale entries' names."""
    v, base_format = m.version, _base_format(m.format)
    scale_names: set[str] = set()
    for e in m.tensors:
        quantized = {"float8_e4m3fn": "fp8", "int4": "int4"}.get(e.dtype)
        if bool(quantized) != bool(e.scale_name):
            raise WeightError(
                f"version {v}: {e.name} ({e.dtype}) must have a scale entry iff it is FP8 or int4"
            )
        if not quantized:
            continue
        if base_format != FORMATS[quantized]:
            raise WeightError(f"version {v}: {e.dtype} tensor {e.name} in a {m.format!r} version")
        scale = entries.get(e.scale_name)
        block = BLOCK if quantized == "fp8" else GROUP
        dims_ok = len(e.shape) in (2, 3) if quantized == "fp8" else len(e.shape) >= 2
        if not dims_ok or e.block_size != block or scale is None:
            raise WeightError(
                f"version {v}: {e.dtype} tensor {e.name} needs {'2 or 3' if quantized == 'fp8' else '2+'} dims, "
                f"block_size {block} and a listed scale entry (has shape {list(e.shape)}, block_size "
                f"{e.block_size}, scale {e.scale_name!r})"
            )
        want = scale_shape(tuple(e.shape)) if quantized == "fp8" else packed_shapes(tuple(e.shape))[1]
        if scale.dtype != "float32" or tuple(scale.shape) != tuple(want):
            raise WeightError(
                f"version {v}: scale {scale.name} of {e.name} is {scale.dtype} {list(scale.shape)}, "
                f"expected float32 {list(want)}"
            )
        scale_names.add(e.scale_name)
    return scale_names


def _check_model(
    m: types_pb2.WeightManifest,
    entries: dict[str, types_pb2.TensorEntry],
    scale_names: set[str],
    fingerprint: str,
    expected_shapes: dict[str, tuple[int, ...]],
) -> None:
    """The tensors are this model's: the same names and shapes, the same fingerprint."""
    v = m.version
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
