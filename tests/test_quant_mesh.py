"""INT4 QAT and unified FP8 through the whole mesh (launcher, Redis, reward, coordinator, a rollout
server, trainer: separate processes, real gRPC): the versions travel in the quantized wire format,
the rollout server applies them, and the train/rollout log-prob mismatch the trainer measures stays
at the level the bf16 wire of the other tensors leaves (on-policy, --sync, so staleness adds none).

Marked slow: each test starts the mesh and runs two training steps on a 128-wide model (the
smallest whose projections fit int4 groups of 128).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from machine_speed import scaled

from mesh_fixtures import build_prompts, build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
# Measured on this model (two steps, --sync): about 1e-3 under QAT or unified FP8, the bf16-wired
# embeddings and norms' share; 0.03-0.08 for int4 rollout without QAT (bench/precision_mismatch.py).
MISMATCH_BOUND = 0.01


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant-mesh")
    model = build_tiny_model(
        d / "model", hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32,
    )  # fmt: skip
    return model, build_prompts(d / "train.jsonl")


def _run(assets, run_dir: Path, redis_url: str, *extra: str) -> list[dict]:
    model, prompts = assets
    argv = [
        sys.executable, str(ROOT / "train.py"), "--hf-checkpoint", str(model), "--prompt-data", str(prompts),
        "--run-dir", str(run_dir), "--redis-url", redis_url, "--rollout-batch-size", "4",
        "--n-samples-per-prompt", "4", "--num-rollout", "2", "--rollout-max-response-len", "4",
        "--lr", "1e-3", "--rollout-num-servers", "1", "--sync", *extra,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "flags, wire",
    [
        (["--int4-qat", "--weight-sync-dtype", "int4"], "int4-group128"),
        (["--fp8-format", "e4m3"], "fp8-block128"),
        # two FSDP2 ranks: quantized in each projection's forward, the push quantized shard by shard
        (["--int4-qat", "--actor-num-gpus-per-node", "2", "--micro-batch-size", "4"], "int4-group128"),
    ],
    ids=["int4-qat", "unified-fp8", "int4-qat-fsdp2"],
)
def test_quantization_aware_mesh_keeps_rollout_and_trainer_together(assets, tmp_path, redis_url, flags, wire):
    run_dir = tmp_path / "run"
    rows = _run(assets, run_dir, redis_url, *flags)
    assert [r["step"] for r in rows] == [1, 2]
    rollout_log = (run_dir / "logs" / "rollout-0.log").read_text()
    assert f"now serving weights version 1 ({wire}" in rollout_log, rollout_log[-2000:]
    mismatch = [r["logprob_abs_diff_mean"] for r in rows]
    print(f"{flags}: logprob_abs_diff_mean per step {mismatch}")  # the figure the issue asks for
    assert all(0 < m < MISMATCH_BOUND for m in mismatch), mismatch
