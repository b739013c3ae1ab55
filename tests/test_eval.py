"""Evaluation while training (--eval-prompt-data): the flags, the round's metrics by hand, and a
real mesh (launcher, Redis, reward, coordinator, two rollout servers, trainer) that evaluates at
version 0, every --eval-interval versions and the last one, into eval.jsonl, metrics.jsonl and the
report, while training goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from machine_speed import scaled

from mesh_fixtures import build_prompts, build_tiny_model
from slipstream.config import parse_config
from slipstream.proto import types_pb2
from slipstream.services.coordinator.eval import EvalSet, EvalSettings, Evaluator

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--eval-prompt-data", "a"], "NAME PATH pairs"),
        (["--eval-prompt-data", "a", "x", "a", "y", "--eval-interval", "2"], "each NAME once"),
        (["--eval-prompt-data", "a", "x"], "go together"),
        (["--eval-interval", "2"], "go together"),
        (["--eval-prompt-data", "a", "x", "--eval-interval", "2", "--eval-top-p", "0"], "--eval-top-p"),
        (
            ["--eval-prompt-data", "a", "x", "--eval-interval", "2", "--n-samples-per-eval-prompt", "0"],
            "at least 1",
        ),
    ],
)
def test_bad_eval_flags_are_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_due_versions_and_the_round_metrics(tmp_path):
    settings = EvalSettings(
        interval=3, last_version=7, n_samples=2, sampling=types_pb2.SamplingParams(), run_dir=tmp_path,
        steps_per_version=2,
    )  # fmt: skip
    assert [v for v in range(9) if settings.due(v)] == [0, 3, 6, 7]
    ev = Evaluator(settings, [EvalSet("a", []), EvalSet("b", [])], lambda c, m: None, lambda: [], None)

    def s(name, prompt, j, n_tokens, versions):
        return types_pb2.Sample(uid=f"eval/6/{name}/{prompt}/{j}", response_length=n_tokens,
                                policy_versions=versions)  # fmt: skip

    samples = [s("a", 0, 0, 2, [6, 6]), s("a", 0, 1, 4, [6, 7, 7, 7]), s("a", 1, 0, 6, [7] * 6),
               s("a", 1, 1, 8, [7] * 8), s("b", 0, 0, 1, [6]), s("b", 0, 1, 1, [6])]  # fmt: skip
    row = ev._row(6, samples, [1.0, 0.0, 0.0, 0.0, 1.0, None])  # None: the reward failed
    assert row["step"] == 12 and row["eval_version"] == 6
    assert (row["eval_versions_min"], row["eval_versions_max"]) == (6, 7)
    assert row["eval/a/accuracy"] == 0.25 and row["eval/a/pass@2"] == 0.5
    assert row["eval/a/response_len_mean"] == 5.0
    assert row["eval/b/accuracy"] == 0.5 and row["eval/b/pass@2"] == 1.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mesh_evaluates_at_zero_every_interval_and_the_end(tmp_path, redis_url):
    model = build_tiny_model(tmp_path / "model")
    prompts = build_prompts(tmp_path / "train.jsonl")
    held_out = build_prompts(tmp_path / "eval.jsonl", n=8, seed=5)
    run_dir = tmp_path / "run"
    argv = [
        sys.executable, str(ROOT / "train.py"), "--hf-checkpoint", str(model), "--prompt-data", str(prompts),
        "--run-dir", str(run_dir), "--redis-url", redis_url, "--rollout-batch-size", "4",
        "--n-samples-per-prompt", "4", "--num-rollout", "3", "--rollout-max-response-len", "4",
        "--rollout-num-servers", "2", "--eval-prompt-data", "held_out", str(held_out), "sums", str(prompts),
        "--eval-interval", "2", "--n-samples-per-eval-prompt", "3", "--eval-temperature", "0",
        "--eval-max-response-len", "3",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(240))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["eval_version"] for r in rows] == [0, 2, 3]
    for r in rows:
        for name in ("held_out", "sums"):
            assert 0.0 <= r[f"eval/{name}/accuracy"] <= r[f"eval/{name}/pass@3"] <= 1.0
            assert 1 <= r[f"eval/{name}/response_len_mean"] <= 3
        assert r["eval_versions_min"] >= r["eval_version"]  # pinned: never older than its version
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "eval_version" not in r] == [1, 2, 3]  # training went on
    assert [r for r in metrics if "eval_version" in r] == rows
    assert (run_dir / "report" / "eval_held_out.png").is_file()
    assert (run_dir / "report" / "eval_sums_len.png").is_file()
