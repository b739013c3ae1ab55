"""Config and flags: slime names, file + flag precedence, one-line errors naming the closest flag."""

import json
import subprocess
import sys

import pytest

from slipstream.config import Config, ConfigError, TrainConfig, config_from_values, load_config, parse_config

SLIME_FLAGS = (
    "--hf-checkpoint --prompt-data --input-key --label-key --apply-chat-template --rollout-batch-size "
    "--n-samples-per-prompt --num-rollout --rollout-max-response-len --rollout-temperature --rollout-top-p "
    "--advantage-estimator --eps-clip --eps-clip-high --lr --global-batch-size --update-weights-interval "
    "--use-tis --tis-clip --save --save-interval --load --rm-type --rm-url --custom-rm-path --seed "
    "--run-dir --redis-url --rollout-num-servers --weight-sync-dtype"
).split()


def test_every_required_flag_exists():
    from slipstream.config import build_parser

    known = {s for a in build_parser()._actions for s in a.option_strings}
    assert [f for f in SLIME_FLAGS if f not in known] == []


def test_flags_fill_the_tree():
    cfg = parse_config(
        ["--rollout-batch-size", "4", "--use-tis", "--eps-clip-high", "0.28", "--weight-sync-dtype", "bf16"]
    )
    assert cfg.rollout.rollout_batch_size == 4
    assert cfg.algo.use_tis is True
    assert cfg.algo.effective_eps_clip_high == pytest.approx(0.28)
    assert cfg.train.weight_sync_dtype == "bf16"
    assert cfg.as_namespace().rollout_batch_size == 4  # slime's flat args


def test_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rollout": {"rollout_batch_size": 7}, "lr": 3e-4}))
    cfg = parse_config(["--config", str(path), "--lr", "1e-5"])
    assert cfg.rollout.rollout_batch_size == 7
    assert cfg.train.lr == pytest.approx(1e-5)


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(["--num-rollout", "3", "--rollout-stop-token-ids", "5", "6"])
    cfg.save_json(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg


def test_invariants_are_checked():
    with pytest.raises(ConfigError, match="global-batch-size must divide"):
        Config(train=TrainConfig(global_batch_size=3))
    with pytest.raises(ConfigError, match="micro-batch-size must divide"):
        Config(train=TrainConfig(global_batch_size=64, micro_batch_size=48))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--rollout-batchsize", "4"],
            "unknown flag --rollout-batchsize (did you mean --rollout-batch-size?)",
        ),
        (["--num-rollout", "0"], "--num-rollout must be positive"),
        (["--weight-sync-dtype", "int3"], "invalid choice"),
        # accepted and ignored before issue 13; refused now, saying what is supported
        (["--actor-num-nodes", "2"], "--actor-num-nodes 2: not supported; the trainer runs on one node"),
        (
            ["--rollout-num-gpus", "2", "--rollout-num-gpus-per-engine", "2"],
            "--rollout-num-gpus-per-engine 2: not supported; the native engine runs on one GPU",
        ),
        (["--rollout-engine", "sglang"], "--rollout-engine sglang: not supported; the native engine"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message):
    proc = subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1]
    assert "Traceback" not in proc.stderr


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rollout_batchsize": 3}))
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)])


def test_help_shows_each_flags_default():
    # Defaults are SUPPRESSed in argparse (so file and env values rank right); the help says them.
    from slipstream.config import FIELDS, build_parser

    actions = {a.dest: a for a in build_parser()._actions}
    missing = [name for name in FIELDS if "(default: " not in (actions[name].help or "")]
    assert missing == []
    proc = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, timeout=60)
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert proc.returncode == 0
    assert (
        "--rollout-batch-size ROLLOUT_BATCH_SIZE Prompts per rollout step (groups per training step). (default: 32)"
        in text
    )
    assert "--lr LR Learning rate (AdamW). (default: 1e-06)" in text
    assert 'empty = start an embedded server. (Slipstream) (default: "")' in text


def test_auto_defaults_resolve_by_device_and_flags():
    """Issue 14's defaults: TIS on unless the ratio is 1, bf16 weight sync from a CPU trainer and
    FP8 from a GPU one, and one micro-batch per optimizer step on CPU (8 on a GPU)."""
    cfg = parse_config([])
    assert cfg.algo.use_tis is None and cfg.algo.effective_use_tis is True
    assert parse_config(["--no-use-tis"]).algo.effective_use_tis is False
    assert parse_config(["--use-rollout-logprobs"]).algo.effective_use_tis is False
    t = cfg.train
    assert (t.effective_weight_sync_dtype("cpu"), t.effective_weight_sync_dtype("cuda")) == ("bf16", "fp8")
    assert t.effective_weight_sync_dtype("cuda", colocate=True) == "bf16"  # CUDA IPC: no bytes to save
    assert parse_config(["--weight-sync-dtype", "fp8"]).train.effective_weight_sync_dtype("cpu") == "fp8"
    assert (
        t.effective_micro_batch_size(512, "cpu") == 512 and t.effective_micro_batch_size(512, "cpu", 2) == 256
    )
    assert t.effective_micro_batch_size(512, "cuda") == 8 and t.effective_micro_batch_size(6, "cuda") == 2
    assert parse_config(["--micro-batch-size", "4"]).train.effective_micro_batch_size(512, "cpu") == 4


def test_slime_hooks_see_use_tis_resolved():
    assert config_from_values({}).as_namespace().use_tis is True  # on by default
    assert config_from_values({"use_rollout_logprobs": True}).as_namespace().use_tis is False
    assert config_from_values({"use_tis": False}).as_namespace().use_tis is False
