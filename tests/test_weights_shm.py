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
import time
from pathlib import Path

import pytest
import torch
from machine_speed import scaled

from mesh_fixtures import build_prompts, build_tiny_model
from slipstream.launcher import REPORT_TIMEOUT_S
from slipstream.proto import types_pb2
from slipstream.services.coordinator.weights_relay import VersionNotNewer, WeightRelay, receive_push
from slipstream.shm_files import pid_namespace
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_a_gpu_trainer_and_a_gpu_server_through_page_locked_shared_memory(exporter, fmt):
    """The trainer's device buffer goes into a page-locked file, the server copies the mapping to
    its GPU page-locked (read-only registration) or, where the driver refuses, pageable: the
    tensors equal the byte path's either way, and every registration is undone."""
    state = {k: v.cuda() for k, v in _state().items()}
    manifest, chunks = exporter.pack(state, 1, fmt)
    assert exporter._segments[0].pinned  # a writable mapping registers on any CUDA driver
    stager = WeightStager(_shapes(), 0, device="cuda", dtype=torch.bfloat16)
    for msg in iter_messages(manifest, chunks):
        stager.add(msg)
    _, tensors = stager.finish()
    reference = WeightStager(_shapes(), 0, device="cuda", dtype=torch.bfloat16)
    for msg in iter_messages(*pack(state, 1, fmt)):
        reference.add(msg)
    _, expected = reference.finish()
    for name, t in expected.items():
        assert tensors[name].is_cuda and torch.equal(tensors[name], t), name
    exporter.close()
    assert not exporter._segments


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


_SMALL_SHM = """
import torch
from slipstream.weights import ShmExporter, WeightError
try:
    ShmExporter().pack({"model.norm.weight": torch.ones(1 << 20)}, 1, "bf16")  # 2 MiB into 1 MiB
except WeightError as e:
    print(e)
"""


@pytest.mark.skipif(
    subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0,
    reason="needs `unshare -m` (root) to mount a small /dev/shm",
)
def test_a_version_larger_than_dev_shm_is_refused_in_one_line_not_a_sigbus():
    script = f'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -c "$0"'
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, _SMALL_SHM], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cannot make a 2097216-byte weights file in /dev/shm (No space left on device)" in done.stdout


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


# ---- the mesh: one rollout server on the trainer's host, one "elsewhere" -------------------------


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-u", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _wait_for(path: Path, text: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + scaled(120)
    while not (path.exists() and text in path.read_text()):
        assert proc.poll() is None, f"{what}: exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what}: never logged {text!r}"
        time.sleep(0.1)


def _launch(tmp_path: Path, redis_url: str) -> tuple[subprocess.Popen, Path]:
    """train.py on the tiny model with one rollout server, for far more steps than a test waits."""
    root = Path(__file__).resolve().parent.parent
    model, prompts = build_tiny_model(tmp_path / "model"), build_prompts(tmp_path / "train.jsonl")
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [
            sys.executable, str(root / "train.py"), "--hf-checkpoint", str(model), "--prompt-data", str(prompts),
            "--run-dir", str(run_dir), "--redis-url", redis_url, "--rollout-batch-size", "4",
            "--n-samples-per-prompt", "4", "--num-rollout", "1000", "--rollout-max-response-len", "4",
            "--global-batch-size", "8", "--micro-batch-size", "8", "--rollout-num-servers", "1",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return launcher, run_dir


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -u` (root) for a server with its own hostname")
def test_a_mesh_maps_shared_memory_on_its_host_and_sends_bytes_elsewhere(tmp_path, redis_url):
    """The launcher's rollout server shares the trainer's host and maps versions from /dev/shm; a
    second server in its own UTS namespace (another hostname: another host id) attaches to the same
    coordinator later and is served bytes: the version it could not map, and what follows."""
    launcher, run_dir = _launch(tmp_path, redis_url)
    far, far_log = None, tmp_path / "far.log"
    try:
        near_log = run_dir / "logs" / "rollout-0.log"
        _wait_for(near_log, "now serving weights version 1 (bf16+shm", launcher, "rollout-0")
        port = (run_dir / "ports" / "coordinator.port").read_text().strip()
        serve = [
            sys.executable, "-m", "slipstream.services.rollout", "--hf-checkpoint", str(tmp_path / "model"), "--port", "0",
            "--coordinator-addr", f"127.0.0.1:{port}", "--server-id", "far", "--rollout-max-batch-size", "8",
            "--rollout-max-response-len", "4", "--torch-threads", "1",
        ]  # fmt: skip
        with far_log.open("w") as out:
            far = subprocess.Popen(
                ["unshare", "-u", "sh", "-c", 'hostname elsewhere && exec "$@"', "sh", *serve], stderr=out
            )
        _wait_for(far_log, "now serving weights version", far, "the server elsewhere")
        launcher.send_signal(signal.SIGINT)  # Ctrl-C: the run saves and stops
        _, err = launcher.communicate(timeout=scaled(60) + REPORT_TIMEOUT_S)
        assert launcher.returncode == 128 + signal.SIGINT, err[-3000:]
    finally:
        for proc in (launcher, far):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(scaled(30))
    served = [line for line in far_log.read_text().splitlines() if "now serving weights version" in line]
    assert served and not any("+shm" in line for line in served), served
    trainer = (run_dir / "logs" / "trainer.log").read_text()
    assert trainer.count("rollout server far is not on this host") == 1, trainer[-2000:]  # said once
    ours = json.loads((run_dir / "pids.json").read_text())["trainer"]
    assert not list(
        shm.SHM_DIR.glob(f"{shm.PREFIX}{pid_namespace()}-{ours}-*")
    )  # the trainer unlinked its files


@pytest.mark.slow
def test_a_trainer_killed_mid_run_leaves_no_file_once_the_launcher_is_done(tmp_path, redis_url):
    """kill -9 of the trainer: nothing of it runs at exit, and the launcher, once every service is
    down, unlinks its /dev/shm weights files (`shm_files.sweep_orphans`)."""
    launcher, run_dir = _launch(tmp_path, redis_url)
    try:
        _wait_for(
            run_dir / "logs" / "rollout-0.log",
            "now serving weights version 1 (bf16+shm",
            launcher,
            "rollout-0",
        )
        trainer = json.loads((run_dir / "pids.json").read_text())["trainer"]
        files = list(shm.SHM_DIR.glob(f"{shm.PREFIX}{pid_namespace()}-{trainer}-*"))
        assert files, "the trainer holds no weights file"
        os.kill(trainer, signal.SIGKILL)
        _, err = launcher.communicate(timeout=scaled(60) + REPORT_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode not in (0, None) and "trainer" in err.strip().splitlines()[-1], err[-2000:]
    assert not list(shm.SHM_DIR.glob(f"{shm.PREFIX}{pid_namespace()}-{trainer}-*"))
