"""LoRA through the whole mesh on CPU (issue 18): the trainer trains adapters only, every rollout
server applies every pushed (merged) version, and the checkpoint is a Hugging Face model of the
merged policy plus the adapters in PEFT's format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from machine_speed import scaled
from safetensors.torch import load_file

from mesh_fixtures import build_prompts, build_tiny_model
from slipstream.models.hf import load_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "trainer",
    [[], ["--actor-num-gpus-per-node", "2", "--micro-batch-size", "4"]],  # one process; two FSDP2 ranks
    ids=["one-process", "fsdp2"],
)
def test_mesh_trains_lora_adapters_and_pushes_merged_weights(tmp_path, redis_url, trainer):
    model, prompts = build_tiny_model(tmp_path / "model"), build_prompts(tmp_path / "train.jsonl")
    run_dir = tmp_path / "run"
    argv = [
        sys.executable, str(ROOT / "train.py"), "--hf-checkpoint", str(model), "--prompt-data", str(prompts),
        "--run-dir", str(run_dir), "--redis-url", redis_url, "--rollout-batch-size", "4",
        "--n-samples-per-prompt", "4", "--num-rollout", "3", "--rollout-max-response-len", "4",
        "--global-batch-size", "8", "--lr", "5e-2", "--rollout-num-servers", "2",
        "--lora-rank", "4", "--lora-alpha", "8", "--target-modules", "q_proj,v_proj,gate_proj",
        "--use-kl-loss", "--kl-loss-coef", "0.1",  # the reference: the base, adapters off
        *trainer,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(300))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["policy_version"] == 3
    assert summary["rollout_server_versions"] == {"rollout-0": 3, "rollout-1": 3}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["num_optimizer_steps"] == 2 for r in rows)

    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    adapters = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    layers = load_model(model).config.num_hidden_layers
    assert len(adapters) == 2 * 3 * layers
    assert all(k.startswith("base_model.model.model.layers.") for k in adapters)
    optimizer = load_file(str(ckpt / "optimizer" / "optimizer.safetensors"))
    assert {k.split("::")[0] for k in optimizer} == {
        k.removeprefix("base_model.model.").replace(".weight", ".default.weight") for k in adapters
    }  # only the adapters have AdamW moments
    base, merged = load_model(model).state_dict(), load_model(ckpt).state_dict()
    for name, tensor in base.items():
        targeted = any(f".{t}." in name for t in ("q_proj", "v_proj", "gate_proj"))
        assert torch.equal(merged[name], tensor) != targeted, name
