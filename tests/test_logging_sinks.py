"""TensorBoard event files and an offline W&B run hold what metrics.jsonl holds, under slime's
names where slime has the metric; a sink asked for without its package fails with one line."""

from __future__ import annotations

import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest
import torch
from machine_speed import scaled

from mesh_fixtures import build_prompts, build_tiny_model
from slipstream import cli
from slipstream.config import ConfigError, config_from_values
from slipstream.services.trainer.logging_sinks import SLIME_NAMES, scalars
from slipstream.services.trainer.sft import train_sft

torch.set_num_threads(1)


def test_scalars_rename_to_slime_and_keep_the_rest():
    row = {"step": 3, "loss": 0.5, "lr": 1e-5, "reward_mean": 0.25, "num_stale": 2, "flag": True,
           "staleness_hist": "{}", "accuracy": None, "grad_norm": float("nan"), "unix_s": 1.8e9}  # fmt: skip
    assert scalars(row) == {
        "train/loss": 0.5, "train/lr-pg_0": 1e-5, "rollout/raw_reward": 0.25, "num_stale": 2.0, "flag": 1.0,
    }  # fmt: skip
    assert len(set(SLIME_NAMES.values())) == len(SLIME_NAMES)  # no two metrics under one name


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a .wandb file (a LevelDB-style log of `Record` protos: 7-byte file
    header, then 32 KiB blocks of chunks with a crc32/length/type header each)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def _history_so_far(run_file: Path) -> list[dict]:
    try:
        return wandb_history(run_file)
    except Exception:  # a record still being written
        return []


def test_tensorboard_and_offline_wandb_get_the_metrics_jsonl_rows(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the flag says offline
    model = build_tiny_model(tmp_path / "model")
    data = build_prompts(tmp_path / "train.jsonl", n=8)
    run_dir = tmp_path / "run"
    cfg = config_from_values(
        dict(
            hf_checkpoint=str(model), prompt_data=str(data), loss_type="sft_loss", run_dir=str(run_dir),
            rollout_batch_size=4, micro_batch_size=4, lr=1e-2, device="cpu", num_rollout=3,
            use_tensorboard=True, use_wandb=True, wandb_mode="offline", wandb_project="test",
            wandb_group="g", lr_decay_style="linear", lr_warmup_iters=1,
        )
    )  # fmt: skip
    train_sft(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    expected = {r["step"]: scalars(r) for r in rows}
    assert {"train/loss", "train/grad_norm", "train/lr-pg_0", "num_trained_tokens"} <= set(expected[1])

    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected[1])
    for name in expected[1]:
        got = {e.step: e.value for e in acc.Scalars(name)}
        assert got == {s: pytest.approx(v[name], rel=1e-6) for s, v in expected.items()}, name

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb's service process writes the file; under a busy test worker its last records can land
    # just after run.finish() returned (the file then held no history yet): wait for them, bounded.
    deadline = time.monotonic() + scaled(30)
    while len(history := _history_so_far(run_file)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h in history:
        assert {k: v for k, v in h.items() if not k.startswith("_")} == pytest.approx(expected[h["_step"]])


def test_a_sink_without_its_package_is_one_line(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = config_from_values(dict(use_wandb=True))  # any service may read the config: no check here
    with pytest.raises(ConfigError, match=r"--use-wandb needs the wandb package: pip install wandb"):
        cfg.logging.check_installed()
    assert cli._train(["--use-wandb", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install wandb" in err[0]
