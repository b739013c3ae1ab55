"""Shared-memory weights (weights/shm.py): a version written once to /dev/shm, mapped and checked
by each reader, and what is left in /dev/shm afterwards (nothing)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slipstream.proto import types_pb2
from slipstream.services.coordinator.weights_relay import VersionNotNewer, WeightRelay, receive_push
from slipstream.weights import ShmExporter, WeightError, WeightStager, iter_messages, pack, shm

pytestmark = pytest.mark.skipif(not shm.SHM_DIR.is_dir() or not shm.host_id(), reason="needs Linux /dev/shm")


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 128, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(256, 128, generator=g),
        "model.norm.weight": torch.rand(128, generator=g),
    }


def _shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _state().items()}


def _stage(manifest, chunks, current: int = 0):
    stager = WeightStager(_shapes(), current)
    for msg in iter_messages(manifest, chunks):
        stager.add(msg)
    return stager.finish()


def _ours(exporter: ShmExporter) -> list[Path]:
    return sorted(shm.SHM_DIR.glob(f"{exporter._tag}*"))


@pytest.fixture
def exporter():
    e = ShmExporter(chunk_bytes=4096)
    yield e
    e.close()
    assert _ours(e) == []


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_a_shared_memory_version_stages_like_the_byte_path(exporter, fmt):
    manifest, chunks = exporter.pack(_state(), 1, fmt)
    assert manifest.format.endswith("+shm") and len(chunks) == 1 and manifest.total_bytes == len(chunks[0])
    doc = json.loads(chunks[0])
    assert Path(doc["path"]).exists() and doc["host"] == shm.host_id()
    version, tensors = _stage(manifest, chunks)
    _, expected = _stage(*pack(_state(), 1, fmt, chunk_bytes=4096))
    assert version == 1 and tensors.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name
    # The byte form of the same version: the byte path's bytes and hashes, staged alike.
    byte_manifest, byte_chunks = exporter.byte_form(manifest)
    reference = pack(_state(), 1, fmt, chunk_bytes=4096)
    assert list(byte_manifest.chunk_sha256) == list(reference[0].chunk_sha256)
    assert b"".join(byte_chunks) == b"".join(reference[1]) and byte_manifest.format == reference[0].format


def test_a_damaged_file_another_host_or_a_rewritten_file_is_refused(exporter):
    manifest, chunks = exporter.pack(_state(), 1, "fp8")
    path = Path(json.loads(chunks[0])["path"])
    with open(path, "r+b") as f:  # one byte of the payload, past the 64-byte header
        f.seek(shm.HEADER_BYTES + 5000)
        byte = f.read(1)
        f.seek(shm.HEADER_BYTES + 5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WeightError, match="chunk 1 of its shared-memory file fails its sha256 check"):
        _stage(manifest, chunks)

    doc = json.loads(chunks[0])
    for edit, message in (
        ({"host": "another-boot/another-host"}, "is on host 'another-boot/another-host'"),
        ({"path": "/etc/passwd"}, "is not a weights file in /dev/shm"),
        ({"nonce": doc["nonce"] + 1}, "rewritten by the trainer before it was read"),
    ):
        data = json.dumps({**doc, **edit}).encode()
        m = types_pb2.WeightManifest()
        m.CopyFrom(manifest)
        m.total_bytes = m.chunk_bytes = len(data)
        m.chunk_sha256[:] = [hashlib.sha256(data).hexdigest()]
        with pytest.raises(WeightError, match=message):
            _stage(m, [data])


def test_files_go_once_every_server_serves_a_newer_version(exporter):
    paths = []
    for version in (1, 2, 3):
        _, chunks = exporter.pack(_state(version), version, "fp8")
        paths.append(Path(json.loads(chunks[0])["path"]))
    assert all(p.exists() for p in paths) and _ours(exporter) == sorted(paths)  # nobody confirmed yet
    exporter.confirm(2)  # v1 and v2 are served everywhere; v3 is not (and is the latest)
    assert not paths[0].exists() and paths[1].exists() and paths[2].exists()  # v2's is the spare
    assert sorted(exporter.files) == _ours(exporter) and len(_ours(exporter)) == 2  # v3, and one spare
    _, chunks = exporter.pack(_state(4), 4, "fp8")  # written into the spare: no new file
    assert len(_ours(exporter)) == 2 and Path(json.loads(chunks[0])["path"]).exists()
    exporter.confirm(4)
    assert len(_ours(exporter)) == 2  # the latest stays (a server attaching later maps it), plus the spare


_READER = """
import sys, json, time
from slipstream.weights import WeightStager
from slipstream.proto import types_pb2
manifest = types_pb2.WeightManifest.FromString(open(sys.argv[1], "rb").read())
doc = open(sys.argv[2], "rb").read()
from slipstream.weights import shm
blob = shm.open_payload(shm.ShmDoc.from_json(doc, manifest.version), manifest)
print("mapped", flush=True)
time.sleep(60)
"""


_WRITER = """
import sys, torch
from slipstream.weights import ShmExporter
e = ShmExporter()
e.pack({"model.norm.weight": torch.ones(1 << 20)}, 1, "bf16")
print(e.files[0], flush=True)
import time; time.sleep(60)
"""


def test_no_file_is_left_after_a_reader_or_the_trainer_is_killed(exporter, tmp_path):
    manifest, chunks = exporter.pack(_state(), 1, "fp8")
    (tmp_path / "m").write_bytes(manifest.SerializeToString())
    (tmp_path / "d").write_bytes(chunks[0])
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(tmp_path / "m"), str(tmp_path / "d")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "mapped"
        os.kill(reader.pid, signal.SIGKILL)  # killed while it maps the file
    finally:
        reader.wait(10)
    exporter.close()
    assert _ours(exporter) == []  # (the fixture asserts it again)

    writer = subprocess.Popen([sys.executable, "-c", _WRITER], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(writer.stdout.readline().strip())
        assert left.exists()
        os.kill(writer.pid, signal.SIGKILL)  # the trainer killed: nothing ran at its exit
    finally:
        writer.wait(10)
    assert left.exists()
    assert left in shm.sweep_orphans() and not left.exists()  # what the next trainer does first


def test_the_relay_takes_the_byte_form_of_a_held_shared_memory_version_once(exporter):
    manifest, chunks = exporter.pack(_state(), 1, "fp8")

    async def push(relay: WeightRelay, messages):
        async def stream():
            for m in messages:
                yield m

        stored = await receive_push(stream(), relay.floor, byte_form_of=relay.byte_form_of)
        relay.commit(stored)
        return stored

    async def scenario():
        relay = WeightRelay()
        await push(relay, iter_messages(manifest, chunks))
        assert relay.byte_form_of is relay.latest and relay.latest.by_reference
        with pytest.raises(VersionNotNewer):  # the same version by reference again: not newer
            await push(relay, iter_messages(manifest, chunks))
        stored = await push(relay, iter_messages(*exporter.byte_form(manifest)))
        assert relay.latest is stored and not stored.by_reference and relay.byte_form_of is None
        with pytest.raises(VersionNotNewer):  # bytes held: nothing of version 1 is taken again
            await push(relay, iter_messages(*exporter.byte_form(manifest)))
        other = pack({**_state(), "model.norm.weight": torch.ones(3)}, 1, "bf16")
        relay2 = WeightRelay()
        await push(relay2, iter_messages(manifest, chunks))
        with pytest.raises(ValueError, match="other tensors"):
            await push(relay2, iter_messages(*other))

    asyncio.run(scenario())
