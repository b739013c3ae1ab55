"""Weights by torch.distributed broadcast (weights/broadcast.py, gloo): the trainer is rank 0 of a
weights group, rollout servers join it from the version's document; the byte form is the fallback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from machine_speed import scaled
from test_weights_shm import _shapes, _state

from mesh_fixtures import build_prompts, build_tiny_model
from slipstream.weights import WeightError, WeightStager, iter_messages, pack
from slipstream.weights.broadcast import BroadcastExporter, BroadcastReceiver

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")


def _stage(manifest, chunks, receiver=None, current: int = 0):
    stager = WeightStager(_shapes(), current, receiver=receiver)
    for msg in iter_messages(manifest, chunks):
        stager.add(msg)
    return stager.finish()


def _receive_in_threads(receivers, manifest, chunks, current: int) -> list:
    """Each receiver stages the version in its own thread (as each rollout server does in its own
    process); returns (version, tensors) or the WeightError, per receiver."""
    out: list = [None] * len(receivers)

    def run(i: int) -> None:
        try:
            out[i] = _stage(manifest, chunks, receivers[i], current)
        except WeightError as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(receivers))]
    for t in threads:
        t.start()
    return out, threads


def test_two_servers_receive_a_version_by_broadcast_like_the_byte_path():
    exporter = BroadcastExporter("127.0.0.1", timeout_s=scaled(20), chunk_bytes=4096)
    receivers = [BroadcastReceiver("a", timeout_s=scaled(20)), BroadcastReceiver("b", timeout_s=scaled(20))]
    try:
        for version in (1, 2):  # the second version: the same members, the same group, no new rendezvous
            manifest, chunks = exporter.pack(_state(version), version, ["a", "b"], "fp8")
            doc = json.loads(chunks[0])
            assert manifest.format == "fp8-block128+broadcast" and doc["ranks"] == {"a": 1, "b": 2}
            assert doc["group"] == 1
            out, threads = _receive_in_threads(receivers, manifest, chunks, version - 1)
            exporter.send(version)
            for t in threads:
                t.join(scaled(30))
            _, expected = _stage(*pack(_state(version), version, "fp8", chunk_bytes=4096))
            for got in out:
                assert not isinstance(got, WeightError), got
                assert got[0] == version
                assert all(torch.equal(got[1][k], t) for k, t in expected.items())
            byte_manifest, byte_chunks = exporter.byte_form(manifest)
            reference = pack(_state(version), version, "fp8", chunk_bytes=4096)
            assert list(byte_manifest.chunk_sha256) == list(reference[0].chunk_sha256)
            assert b"".join(byte_chunks) == b"".join(reference[1])
        # Another member set: a new group.
        _, chunks = exporter.pack(_state(3), 3, ["a"], "fp8")
        assert json.loads(chunks[0])["group"] == 2
    finally:
        exporter.close()


def test_a_member_that_never_joins_fails_the_broadcast_in_one_line():
    exporter = BroadcastExporter("127.0.0.1", timeout_s=2.0, chunk_bytes=4096)
    receiver = BroadcastReceiver("a", timeout_s=2.0)
    try:
        manifest, chunks = exporter.pack(_state(), 1, ["a", "gone"], "fp8")
        out, threads = _receive_in_threads([receiver], manifest, chunks, 0)
        with pytest.raises(WeightError, match=r"broadcast of version 1 to a, gone failed within 2s"):
            exporter.send(1)
        for t in threads:
            t.join(scaled(30))
        assert isinstance(out[0], WeightError) and "could not receive its broadcast" in str(out[0])
        # A server the version was not broadcast to refuses it before joining anything.
        with pytest.raises(WeightError, match="'c' is not in its weights group"):
            _stage(manifest, chunks, BroadcastReceiver("c"))
        with pytest.raises(WeightError, match="in no weights group"):
            _stage(manifest, chunks)
    finally:
        exporter.close()


@pytest.mark.slow
def test_a_mesh_with_two_rollout_servers_receives_every_version_by_broadcast(tmp_path, redis_url):
    root = Path(__file__).resolve().parent.parent
    model, prompts = build_tiny_model(tmp_path / "model"), build_prompts(tmp_path / "train.jsonl")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, str(root / "train.py"), "--hf-checkpoint", str(model), "--prompt-data", str(prompts),
            "--run-dir", str(run_dir), "--redis-url", redis_url, "--rollout-batch-size", "4",
            "--n-samples-per-prompt", "4", "--num-rollout", "3", "--rollout-max-response-len", "4",
            "--global-batch-size", "8", "--micro-batch-size", "8", "--rollout-num-servers", "2",
            "--weight-transport", "broadcast",
        ],
        capture_output=True, text=True, timeout=scaled(300),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rollout_server_versions"] == {"rollout-0": 3, "rollout-1": 3}
    for name in ("rollout-0", "rollout-1"):
        log = (run_dir / "logs" / f"{name}.log").read_text()
        served = [line for line in log.splitlines() if "now serving weights version" in line]
        assert len(served) == 3 and all("+broadcast" in line for line in served), served
    trainer = (run_dir / "logs" / "trainer.log").read_text()
    assert "again as bytes" not in trainer, trainer[-2000:]
