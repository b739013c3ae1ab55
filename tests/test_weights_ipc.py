"""Colocated weight sync (CUDA IPC): the handle document, the refusals, and two processes on one GPU.

On CPU: the document's round trip and every malformed one refused, the stager's checks of a
colocated manifest, the coordinator's relay accepting such a stream unchanged, and a clear
refusal where no CUDA device is. On a GPU (marked `gpu`): a sender keeps versions in its
buffers, a second process stages them by handle and gets exactly the sender's tensors; a
version overwritten before it was read, a handle opened in its own process and a garbled
handle are each refused with one line.
"""

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slipstream.proto import types_pb2
from slipstream.services.coordinator.weights_relay import receive_push
from slipstream.weights import IpcExporter, WeightError, WeightStager, iter_messages, pack
from slipstream.weights.ipc import DOC_KIND, HEADER_BYTES, IPC_SUFFIX, IpcDoc
from slipstream.weights.packer import plan

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "model.embed_tokens.weight": (50, 24),
    "model.layers.0.input_layernorm.weight": (24,),
    "model.layers.0.self_attn.q_proj.weight": (200, 24),  # partial blocks on both edges
    "model.layers.0.mlp.down_proj.weight": (24, 300),
}


def _state_dict(seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {name: torch.randn(shape, generator=g).to(torch.bfloat16) for name, shape in SHAPES.items()}
    sd["model.rotary.positions"] = torch.arange(5)
    return {k: v.to(device) for k, v in sd.items()}


def _shapes(sd):
    return {name: tuple(t.shape) for name, t in sd.items()}


def _doc(version: int = 1, **changes) -> IpcDoc:
    fields = dict(
        version=version, device_uuid="GPU-test", nonce=7, payload_offset=HEADER_BYTES, payload_bytes=100,
        storage_size=HEADER_BYTES + 100, storage_offset=0, handle=b"\x01" * 64, ref_counter_handle=b"/torch_1",
        ref_counter_offset=0, event_handle=None, event_sync_required=False,
    )  # fmt: skip
    fields.update(changes)
    return IpcDoc(**fields)


def _colocated_version(sd, version: int, fmt: str = "fp8"):
    """A colocated version as `IpcExporter.pack` lays it out, with a handle that opens nowhere."""
    manifest, _, total = plan(sd, version, fmt)
    doc = _doc(version, payload_bytes=total, storage_size=HEADER_BYTES + total).to_json()
    manifest.format += IPC_SUFFIX
    manifest.total_bytes = manifest.chunk_bytes = len(doc)
    manifest.chunk_sha256.append(hashlib.sha256(doc).hexdigest())
    return manifest, [doc]


# ---- CPU ----------------------------------------------------------------------------------------


def test_handle_document_round_trip():
    doc = _doc(event_handle=b"\x02" * 64, event_sync_required=True)
    data = doc.to_json()
    assert json.loads(data)["kind"] == DOC_KIND  # JSON, base64 for bytes: nothing pickled
    assert IpcDoc.from_json(data, 1) == doc


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"not json", "unreadable"),
        (lambda d: json.dumps({**d, "kind": "pickle"}).encode(), "unreadable"),
        (lambda d: json.dumps({**d, "extra": 1}).encode(), "unreadable"),
        (lambda d: json.dumps({**d, "handle": "%%%"}).encode(), "unreadable"),
        (lambda d: json.dumps({**d, "nonce": -1}).encode(), "malformed"),
        (lambda d: json.dumps({**d, "payload_bytes": "100"}).encode(), "malformed"),
        (lambda d: json.dumps({**d, "version": 2}).encode(), "handle is for version 2"),
        (lambda d: json.dumps({**d, "payload_offset": 0}).encode(), "does not fit"),
        (lambda d: json.dumps({**d, "payload_bytes": 10**9}).encode(), "does not fit"),
    ],
)
def test_malformed_handle_documents_are_refused(mutate, message):
    good = json.loads(_doc().to_json())
    with pytest.raises(WeightError, match=message):
        IpcDoc.from_json(mutate(good), 1)


def test_a_colocated_manifest_is_checked_like_any_other():
    sd = _state_dict()
    manifest, chunks = _colocated_version(sd, 3)
    stager = WeightStager(_shapes(sd), 0)
    for msg in iter_messages(manifest, chunks):
        stager.add(msg)  # names, shapes, dtypes, offsets and the one chunk's hash all pass
    wrong = dict(_shapes(sd), **{"model.layers.0.mlp.down_proj.weight": (24, 301)})
    with pytest.raises(WeightError, match="down_proj.weight has shape"):
        WeightStager(wrong, 0).add(types_pb2.WeightMessage(manifest=manifest))
    two = types_pb2.WeightManifest()
    two.CopyFrom(manifest)
    two.chunk_bytes = 10
    two.chunk_sha256[:] = ["0" * 64] * -(-two.total_bytes // 10)
    with pytest.raises(WeightError, match="one chunk of at most"):
        WeightStager(_shapes(sd), 0).add(types_pb2.WeightMessage(manifest=two))
    with pytest.raises(WeightError, match="not newer"):
        WeightStager(_shapes(sd), 3).add(types_pb2.WeightMessage(manifest=manifest))


def test_a_tampered_handle_document_fails_its_hash():
    sd = _state_dict()
    manifest, chunks = _colocated_version(sd, 1)
    stager = WeightStager(_shapes(sd), 0)
    stager.add(types_pb2.WeightMessage(manifest=manifest))
    tampered = chunks[0].replace(b'"nonce": 7', b'"nonce": 8')
    stager.add(types_pb2.WeightMessage(chunk=types_pb2.WeightChunk(version=1, index=0, data=tampered)))
    with pytest.raises(WeightError, match="chunk 0 fails its sha256"):
        stager.finish()


def test_the_coordinator_relays_a_colocated_version_unchanged():
    sd = _state_dict()
    manifest, chunks = _colocated_version(sd, 1)

    async def stream():
        for msg in iter_messages(manifest, chunks):
            yield msg

    stored = asyncio.run(receive_push(stream(), 0))
    assert stored.version == 1 and stored.messages[1].chunk.data == chunks[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA refusal")
def test_without_cuda_a_colocated_version_is_refused_in_one_line():
    sd = _state_dict()
    manifest, chunks = _colocated_version(sd, 1)
    stager = WeightStager(_shapes(sd), 0)
    for msg in iter_messages(manifest, chunks):
        stager.add(msg)
    with pytest.raises(WeightError, match="no CUDA device .* use the byte path"):
        stager.finish()
    assert stager.current_version == 0
    with pytest.raises(WeightError, match="needs the weights on a CUDA device"):
        IpcExporter().pack(sd, 1)


def test_exporter_bounds():
    with pytest.raises(ValueError, match="at least 1"):
        IpcExporter(max_unconfirmed=0)


def test_byte_path_decodes_to_the_asked_dtype():
    sd = _state_dict()
    manifest, chunks = pack(sd, 1, "fp8", chunk_bytes=512)
    stager = WeightStager(_shapes(sd), 0, dtype=torch.bfloat16)
    for msg in iter_messages(manifest, chunks):
        stager.add(msg)
    _, out = stager.finish()
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(out["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert out["model.rotary.positions"].dtype == torch.int64


# ---- GPU: two processes on one GPU --------------------------------------------------------------

# The receiver: reads length-prefixed WeightMessages per version from stdin, stages each with a
# fresh WeightStager and prints one JSON line per version: the tensors (float64 bytes, base64) or
# the refusal.
RECEIVER = textwrap.dedent(
    """
    import base64, json, struct, sys
    import torch
    from slipstream.proto import types_pb2
    from slipstream.weights import WeightError, WeightStager
    shapes = json.loads(sys.stdin.buffer.readline())
    current = 0
    while True:
        head = sys.stdin.buffer.read(4)
        if not head:
            break
        (count,) = struct.unpack("<I", head)
        stager = WeightStager({k: tuple(v) for k, v in shapes.items()}, current)
        try:
            for _ in range(count):
                (n,) = struct.unpack("<I", sys.stdin.buffer.read(4))
                stager.add(types_pb2.WeightMessage.FromString(sys.stdin.buffer.read(n)))
            version, out = stager.finish()
            current = version
            reply = {k: [str(v.device), base64.b64encode(v.double().cpu().numpy().tobytes()).decode()]
                     for k, v in out.items()}
        except WeightError as e:
            reply = {"error": str(e)}
        print(json.dumps(reply), flush=True)
    """
)


def _frame(manifest, chunks) -> bytes:
    msgs = [m.SerializeToString() for m in iter_messages(manifest, chunks)]
    return struct.pack("<I", len(msgs)) + b"".join(struct.pack("<I", len(m)) + m for m in msgs)


def _decoded(reply: dict) -> dict[str, torch.Tensor]:
    return {
        k: torch.frombuffer(bytearray(base64.b64decode(b)), dtype=torch.float64)
        for k, (_, b) in reply.items()
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_processes_on_one_gpu():
    sd = _state_dict(device="cuda")
    exporter = IpcExporter(max_unconfirmed=2)
    v1 = exporter.pack(sd, 1, "fp8")
    v2 = exporter.pack(_state_dict(seed=1, device="cuda"), 2, "bf16")
    sd3 = _state_dict(seed=2, device="cuda")
    v3 = exporter.pack(sd3, 3, "fp8")  # both buffers wait unconfirmed: v1's is reused
    assert exporter.held_versions == [2, 3]
    expected = {}
    for version, (state, fmt) in {2: (_state_dict(seed=1, device="cuda"), "bf16"), 3: (sd3, "fp8")}.items():
        stager = WeightStager(_shapes(sd), version - 1, device="cuda")
        for msg in iter_messages(*pack(state, version, fmt)):
            stager.add(msg)
        expected[version] = {k: v.double().cpu().reshape(-1) for k, v in stager.finish()[1].items()}

    # The handle of this process's own buffer does not open here (CUDA IPC is across processes).
    own = WeightStager(_shapes(sd), 2)
    for msg in iter_messages(*v3):
        own.add(msg)
    with pytest.raises(WeightError, match="does not open in this process"):
        own.finish()

    # A garbled handle (a well-formed document whose handle bytes are wrong) does not open either.
    gdoc = dataclasses.replace(IpcDoc.from_json(v3[1][0], 3), version=4, handle=bytes(64)).to_json()
    gm = types_pb2.WeightManifest()
    gm.CopyFrom(v3[0])
    gm.version = 4
    gm.total_bytes = gm.chunk_bytes = len(gdoc)
    gm.chunk_sha256[:] = [hashlib.sha256(gdoc).hexdigest()]

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    stdin = json.dumps({k: list(v.shape) for k, v in sd.items()}).encode() + b"\n"
    stdin += _frame(*v1) + _frame(*v2) + _frame(*v3) + _frame(gm, [gdoc])
    proc = subprocess.run(
        [sys.executable, "-c", RECEIVER], input=stdin, capture_output=True, env=env, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    replies = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert len(replies) == 4
    assert "overwritten by the sender before" in replies[0]["error"], replies[0]
    for reply, version in ((replies[1], 2), (replies[2], 3)):
        assert "error" not in reply, reply
        assert all(dev.startswith("cuda") for dev, _ in reply.values())
        got = _decoded(reply)
        assert got.keys() == expected[version].keys()
        for name in got:
            assert torch.equal(got[name], expected[version][name]), name
    assert "does not open in this process" in replies[3]["error"], replies[3]
    exporter.confirm(3)
    assert exporter.held_versions == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(200, 24), (24, 300), (1024, 3072), (128, 128), (1, 1)])
def test_block_kernels_equal_the_pytorch_definition(shape):
    from slipstream.kernels import fp8_block
    from slipstream.quant import fp8

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(shape, generator=g, device="cuda") * torch.logspace(-6, 2, shape[1], device="cuda")
    w = w.to(torch.bfloat16)
    w[0, 0] = 0.0
    if shape[0] > 128:
        w[128:256] = 0.0  # an all-zero block row
    q, s = fp8_block.quantize(w)
    rq, rs = fp8.quantize_blockwise(w.cpu())  # the PyTorch definition
    assert torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(fp8_block.dequantize(q, s, dtype).cpu(), fp8.dequantize_blockwise(rq, rs, dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("widths", [(24, 300, 1), (128, 3072, 1024)])  # any N; every N a multiple of 16
def test_one_launch_per_version_kernels_equal_the_pytorch_definition(widths):
    from slipstream.kernels import fp8_block
    from slipstream.quant import fp8

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(200, widths[0]), (1024, widths[1]), (1, widths[2]), (300, widths[0])]
    mats = []
    for m, n in shapes:
        w = torch.randn((m, n), generator=g, device="cuda") * torch.logspace(-6, 2, n, device="cuda")
        w = w.to(torch.bfloat16)
        w[0, 0] = 0.0
        if m > 256:
            w[128:256] = 0.0  # an all-zero block row
        mats.append(w)
    jobs, at = [], 64  # offsets as a blob lays them out: 64-byte aligned, not from 0
    for w in mats:
        s_shape = fp8.scale_shape(w.shape)
        q_off, s_off = at, at + -(-w.numel() // 64) * 64
        jobs.append((w, q_off, s_off))
        at = s_off + -(-(s_shape[0] * s_shape[1] * 4) // 64) * 64
    blob = torch.full((at,), 0x5A, dtype=torch.uint8, device="cuda")  # poisoned
    fp8_block.quantize_many(blob, jobs)
    host = blob.cpu()
    refs = []
    for w, q_off, s_off in jobs:
        rq, rs = fp8.quantize_blockwise(w.cpu())  # the PyTorch definition
        assert torch.equal(host[q_off : q_off + rq.numel()], rq.view(torch.uint8).reshape(-1))
        assert torch.equal(host[s_off : s_off + rs.numel() * 4].view(torch.float32), rs.reshape(-1))
        refs.append((rq, rs))
    specs = [(q_off, s_off, tuple(w.shape)) for w, q_off, s_off in jobs]
    for dtype in (torch.float32, torch.bfloat16):
        got = fp8_block.dequantize_many(blob, specs, dtype)
        for out, (rq, rs) in zip(got, refs, strict=True):
            assert out.dtype == dtype and out.is_cuda
            assert torch.equal(out.cpu(), fp8.dequantize_blockwise(rq, rs, dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_version_packed_on_the_gpu_is_byte_identical_to_the_cpu_one_and_stages_the_same():
    sd = _state_dict(seed=3)
    cpu_manifest, cpu_chunks = pack(sd, 1, "fp8", chunk_bytes=4096)
    gpu_manifest, gpu_chunks = pack({k: v.cuda() for k, v in sd.items()}, 1, "fp8", chunk_bytes=4096)
    assert gpu_manifest == cpu_manifest and gpu_chunks == cpu_chunks
    staged = {}
    for device in ("cpu", "cuda"):
        stager = WeightStager(_shapes(sd), 0, device=device, dtype=torch.bfloat16)
        for msg in iter_messages(gpu_manifest, gpu_chunks):
            stager.add(msg)
        staged[device] = stager.finish()[1]
    for name, t in staged["cpu"].items():
        assert torch.equal(staged["cuda"][name].cpu(), t), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("keep_fp8", [False, True])
def test_stacked_experts_pack_and_stage_on_the_gpu_as_on_the_cpu(keep_fp8):
    """FP8 stacked experts on the GPU: `fill` quantizes [4, 256, 128] in the version's one launch (as
    a [1024, 128] matrix) and [3, 200, 130] expert by expert, the stager dequantizes them the same two
    ways (also for an FP8 engine: experts always dequantized); bytes and tensors equal the CPU's."""
    g = torch.Generator().manual_seed(5)
    sd = _state_dict(seed=5)
    sd["model.layers.0.mlp.experts.gate_up_proj"] = torch.randn(4, 256, 128, generator=g).to(torch.bfloat16)
    sd["model.layers.0.mlp.experts.down_proj"] = torch.randn(3, 200, 130, generator=g).to(torch.bfloat16)
    cpu_manifest, cpu_chunks = pack(sd, 1, "fp8", chunk_bytes=4096)
    gpu_manifest, gpu_chunks = pack({k: v.cuda() for k, v in sd.items()}, 1, "fp8", chunk_bytes=4096)
    assert gpu_manifest == cpu_manifest and gpu_chunks == cpu_chunks
    staged = {}
    for device in ("cpu", "cuda"):
        stager = WeightStager(_shapes(sd), 0, device=device, dtype=torch.bfloat16, keep_fp8=keep_fp8)
        for msg in iter_messages(gpu_manifest, gpu_chunks):
            stager.add(msg)
        staged[device] = stager.finish()[1]
    assert staged["cpu"].keys() == staged["cuda"].keys()
    for name, t in staged["cpu"].items():
        assert torch.equal(staged["cuda"][name].cpu().view(torch.uint8), t.view(torch.uint8)), name
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert staged["cuda"][name].dtype == torch.bfloat16 and name + "_scale_inv" not in staged["cuda"]
