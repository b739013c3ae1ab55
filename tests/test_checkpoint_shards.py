"""A big optimizer state is cut into shards written side by side, and loads back whole."""

from __future__ import annotations

import torch

from slipstream.models.config import ModelConfig
from slipstream.models.hf import init_model
from slipstream.services.trainer import checkpoint
from slipstream.services.trainer.checkpoint import load_trainer_state, resolve_checkpoint, save_checkpoint

TINY = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)  # fmt: skip


def _trained(seed: int):
    model = init_model(TINY, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(seed)
    model(torch.randint(0, 64, (2, 8))).float().pow(2).mean().backward()
    opt.step()
    return model, opt


def test_optimizer_shards_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 8 << 10)  # a tiny model's moments: several shards
    model, opt = _trained(0)
    ckpt = save_checkpoint(tmp_path, 3, model, opt, {"policy_version": 3})
    shards = sorted(p.name for p in (ckpt / "optimizer").iterdir())
    assert len(shards) > 1 and all(p.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards), shards
    assert not list(tmp_path.glob(".*.tmp")) and (tmp_path / "latest").read_text().strip() == "step_000003"

    fresh, fresh_opt = _trained(1)
    load_trainer_state(resolve_checkpoint(str(tmp_path)), fresh, fresh_opt)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), (name, key)


def test_a_failed_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    """An error in any of the side-by-side writers is raised, and `latest` does not move."""
    model, opt = _trained(0)
    save_checkpoint(tmp_path, 1, model, opt, {"policy_version": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    try:
        save_checkpoint(tmp_path, 2, model, opt, {"policy_version": 2})
    except OSError as e:
        assert e.errno == 28
    else:
        raise AssertionError("the failed write was not raised")
    assert (tmp_path / "latest").read_text().strip() == "step_000001"
    assert not (tmp_path / "step_000002").exists()
