"""Speculative RL through the whole mesh (issue 19): online draft training plus speculative rollout.

Separate processes as in tests/test_mesh.py. The trainer trains the draft head on the rollout
tokens (--enable-mtp-training) and ships it inside every weights version; the rollout servers draft
with it (--speculative-algorithm EAGLE) and say, at each version, how many tokens a verify step
kept per sequence. The run must finish, the draft loss must fall, and the servers must have
decoded speculatively with more than one token kept per verify step.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from machine_speed import scaled

from mesh_fixtures import build_prompts, build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
KEPT = re.compile(
    r"speculative decoding so far: ([0-9.]+) tokens per sequence per verify step \((\d+) verify"
)


def test_mesh_trains_the_draft_online_and_rolls_out_speculatively(tmp_path, redis_url):
    model = build_tiny_model(tmp_path / "model")
    prompts = build_prompts(tmp_path / "train.jsonl")
    run_dir = tmp_path / "run"
    argv = [
        sys.executable, str(ROOT / "train.py"), "--hf-checkpoint", str(model), "--prompt-data", str(prompts),
        "--run-dir", str(run_dir), "--redis-url", redis_url, "--rollout-batch-size", "4",
        "--n-samples-per-prompt", "4", "--num-rollout", "4", "--rollout-max-response-len", "16",
        "--lr", "3e-3", "--rollout-num-servers", "1", "--mtp-num-layers", "1", "--enable-mtp-training",
        "--mtp-loss-scaling-factor", "1.0", "--sglang-speculative-algorithm", "EAGLE",
        "--sglang-speculative-num-steps", "3", "--sglang-speculative-eagle-topk", "1",
        "--sglang-speculative-num-draft-tokens", "4",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(300))
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    losses = [r["mtp_loss"] for r in rows]
    assert losses[-1] < losses[0], losses

    log = "\n".join(p.read_text() for p in (run_dir / "logs").glob("rollout*.log"))
    kept = [(float(a), int(n)) for a, n in KEPT.findall(log)]
    assert kept, log[-2000:]
    length, steps = kept[-1]
    assert steps > 0 and length > 1.0, kept
