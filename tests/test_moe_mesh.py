"""A tiny Qwen3-MoE through the whole mesh with rollout routing replay (R3, issue 15 item 6).

Separate processes as in tests/test_mesh.py: the rollout servers' native engine records the
experts of every position it feeds, they cross the wire and the Redis buffer packed, and the
trainer replays them: every trained token-layer uses the rollout's experts (agreement 1.0; a
record lost or misaligned anywhere on the way would route itself and show below 1), and the
weights moved.
"""

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

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
MOE = dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def test_moe_mesh_trains_with_rollout_routing_replay(tmp_path, redis_url):
    model = build_tiny_model(tmp_path / "model", **MOE)
    prompts = build_prompts(tmp_path / "train.jsonl")
    run_dir = tmp_path / "run"
    argv = [
        sys.executable, str(ROOT / "train.py"), "--hf-checkpoint", str(model), "--prompt-data", str(prompts),
        "--run-dir", str(run_dir), "--redis-url", redis_url, "--rollout-batch-size", "4",
        "--n-samples-per-prompt", "4", "--num-rollout", "3", "--rollout-max-response-len", "4",
        "--lr", "1e-3", "--rollout-num-servers", "2", "--use-rollout-routing-replay",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(300))
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["moe_routing_agreement"] == 1.0 for r in rows), [r["moe_routing_agreement"] for r in rows]
    assert all(0.0 < r["moe_router_agreement"] <= 1.0 for r in rows)
    assert all(
        r["moe_logprob_abs_diff_replay"] >= 0 and r["moe_logprob_abs_diff_no_replay"] >= 0 for r in rows
    )
    assert all(r["moe_aux_loss"] > 0 and r["moe_expert_load_max"] >= 1.0 for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows) and rows[-1]["policy_version"] == 3

    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    before, after = load_file(str(model / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(".mlp.gate." in k for k in moved) and any(".mlp.experts." in k for k in moved), moved
