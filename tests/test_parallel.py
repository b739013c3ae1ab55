"""FSDP2 trainer parallelism on CPU with gloo: world size 2 trains like one process,
checkpoints move between world sizes (written by 2 ranks, loaded by 1), and follower ranks push
and save exactly when rank 0 does."""

import json
import sys
from pathlib import Path

import pytest
import torch

from mesh_fixtures import build_tiny_model
from slipstream.models.hf import load_model
from slipstream.services.trainer.checkpoint import load_trainer_state, resolve_checkpoint, save_checkpoint

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fsdp_worker  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("fsdp") / "model")


def _single_process(model_dir: Path):
    torch.manual_seed(0)
    model = load_model(model_dir)
    tokens = fsdp_worker.global_batch(model.config.vocab_size)
    opt = fsdp_worker.train(model, tokens)
    return model, opt


def test_checkpoint_round_trip_single_process(model_dir, tmp_path):
    model, opt = _single_process(model_dir)
    save_checkpoint(tmp_path, 2, model, opt, {"policy_version": 2})
    fresh = load_model(model_dir)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = load_trainer_state(resolve_checkpoint(str(tmp_path)), fresh, fresh_opt)
    assert state["policy_version"] == 2 and state["step"] == 2
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    # The restored moments drive the next step exactly like the uninterrupted optimizer.
    tokens = fsdp_worker.global_batch(model.config.vocab_size)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        o.step()
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_fsdp2_world_size_2_matches_one_process_and_reshards(model_dir, tmp_path):
    out = tmp_path / "ckpt"
    fsdp_worker.run_two_ranks(model_dir, out, None)
    ckpt = resolve_checkpoint(str(out))
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2

    # Load what 2 ranks wrote into one process: same weights as training on one process
    # (gradients averaged over two halves of the batch = the gradient of the whole batch).
    # Tolerance: two AdamW steps at lr 1e-2 move each weight by ~2e-2; reduction-order noise in
    # small gradients reaches ~5e-5 through Adam's normalisation, so 1e-4 is 0.5% of a step.
    reference, _ = _single_process(model_dir)
    resumed = load_model(model_dir)
    load_trainer_state(ckpt, resumed, torch.optim.AdamW(resumed.parameters(), lr=1e-2))
    for (n, a), (_, b) in zip(reference.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=n)


def test_followers_push_and_save_when_rank_0_does(model_dir, tmp_path):
    """The cadence lives on rank 0 only: a follower whose own config says "push and save every
    step" still gathers weights and saves exactly where rank 0 (interval 2, save interval 3)
    does, or the FSDP collectives would hang; the last save comes with the stop."""
    fsdp_worker.run_two_ranks(model_dir, tmp_path, "schedule")
    expected = ["train", "train", "push", "train", "save 3", "train", "push", "train", "save 5"]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"events_{rank}.json").read_text()) == expected, rank
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000005"]
