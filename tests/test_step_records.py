"""What a run writes for people to read (issue 13 item 10): trainer.log's line per step and its
last line, accuracy `none` for a step without a scored sample, checkpoint files of one mode,
and the demo's verdict on one line when stdout/stderr is a file."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from slipstream.services.trainer.metrics import MetricsLog, group_metrics
from slipstream.types import Sample, Status


def _sample(reward: float | None, status: Status = Status.COMPLETED) -> Sample:
    s = Sample(prompt="1+1=", response="2", response_length=1, status=status, policy_versions=[0])
    s.reward = reward
    return s


def test_a_step_without_a_scored_sample_has_no_accuracy():
    assert group_metrics([_sample(1.0), _sample(0.0)], 0)["accuracy"] == 0.5
    assert group_metrics([], 0)["accuracy"] is None
    assert group_metrics([_sample(None, Status.FAILED)], 0)["accuracy"] is None


def test_trainer_log_has_a_line_per_step_and_a_last_line(tmp_path, caplog):
    log = MetricsLog(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="slipstream.trainer"):
        log.write(
            step=1,
            policy_version=1,
            reward_mean=0.5,
            accuracy=0.5,
            num_samples=8,
            loss=0.1,
            tokens_per_s=10.0,
        )
        log.write(step=2, policy_version=2, reward_mean=0.0, accuracy=None, num_samples=0, tokens_per_s=0.0)
        log.write_summary(finished=True, policy_version=2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("step 1: reward 0.500 acc 0.500 (8 samples")
    assert lines[1].startswith("step 2: reward 0.000 acc none (0 samples")
    assert lines[2].startswith("run done: 2 steps in") and "accuracy first 5 0.500 last 5 0.500" in lines[2]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["accuracy"] is None  # null in metrics.jsonl
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accuracy_first5"] == 0.5  # the step without one does not count as 0


def test_summary_accuracy_is_none_when_no_step_scored(tmp_path):
    log = MetricsLog(str(tmp_path))
    log.write(step=1, policy_version=1, reward_mean=0.0, accuracy=None, tokens_per_s=0.0)
    log.write_summary()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accuracy_first5"] is None and summary["accuracy_last5"] is None


def test_every_checkpoint_file_has_one_mode(tmp_path):
    import torch

    from slipstream.models.hf import load_model
    from slipstream.services.trainer.checkpoint import save_checkpoint
    from tests.mesh_fixtures import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model")
    (model_dir / "tokenizer.json").chmod(0o600)  # a source file's own mode is not copied either
    model = load_model(model_dir)
    path = save_checkpoint(
        tmp_path / "ckpt", 1, model, torch.optim.AdamW(model.parameters()), {}, tokenizer_dir=str(model_dir)
    )
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in path.rglob("*") if p.is_file()]
    modes = {p.relative_to(path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert {"model.safetensors", "optimizer/optimizer.safetensors", "tokenizer.json"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.parametrize(
    "first, last, held_out, word",
    [(0.25, 0.9, (0.3, 0.8), "target met"), (None, None, (0.6, 0.5), "target missed")],
)
def test_the_demo_verdict_is_one_line_in_a_file(tmp_path, monkeypatch, capsys, first, last, held_out, word):
    import slipstream.demo.run
    import slipstream.launcher
    from slipstream.demo.run import main

    run_dir = tmp_path / "a-rather-long-run-directory-name-so-the-line-is-long"
    model_dir = run_dir / "prep" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")

    def run(cfg, **kw):
        (run_dir / "summary.json").write_text(json.dumps({"accuracy_first5": first, "accuracy_last5": last}))
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "latest").write_text("step_000100")
        return 0

    monkeypatch.setattr(slipstream.launcher, "run", run)  # the held-out scores stand in for the models'
    monkeypatch.setattr(slipstream.demo.run, "held_out_greedy", lambda d: held_out[Path(d) != model_dir])
    monkeypatch.setenv("COLUMNS", "80")
    main(["--run-dir", str(run_dir)])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("demo: greedy accuracy")]
    assert word in line and line.endswith("metrics.jsonl")
