"""The draft head (models/draft.py) and its online training (services/trainer/draft.py).

- files: the draft saves and loads as HF-style safetensors under DeepSeek-V3's MTP names, and a
  draft of the wrong depth or for another target is refused;
- training: the draft loss falls on rollout tokens while the policy's weights and gradients are
  untouched by it (the trunk is detached), and the draft's parameters get their own AdamW state;
- the manifest binds draft and target: the trainer's push carries the draft, the rollout side
  stages it into the engine with the version, and a version without the draft is refused by a
  server that expects one (so it never drafts with an older draft).
"""

from __future__ import annotations

import pytest
import torch
from fsdp_worker import run_two_ranks

from mesh_fixtures import build_tiny_model
from slipstream.config import config_from_values
from slipstream.models.draft import DraftHead, draft_shapes, init_draft, load_draft, save_draft
from slipstream.models.hf import load_model
from slipstream.services.rollout.engine.native import NativeEngine
from slipstream.services.rollout.engine.request import Request
from slipstream.services.trainer.actor import Actor
from slipstream.types import Sample, Status
from slipstream.weights import WeightError, WeightStager, iter_messages, pack, weights_to_sync

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("draft") / "model")


def _cfg(model_dir, **kw):
    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=2, n_samples_per_prompt=4, micro_batch_size=4,
        lr=3e-3, device="cpu", rollout_max_response_len=16, mtp_num_layers=1, enable_mtp_training=True,
        mtp_loss_scaling_factor=0.5,
    )  # fmt: skip
    values.update(kw)
    return config_from_values(values)


def _samples() -> list[Sample]:
    """Responses with structure a draft can learn: a counting pattern over the tiny vocabulary."""
    out = []
    for i in range(8):
        resp = [5 + (i + j) % 12 for j in range(12)]
        out.append(
            Sample(
                tokens=[7, 8, 9] + resp,
                response_length=len(resp),
                reward=float(i % 2),
                status=Status.COMPLETED,
                policy_versions=[0] * len(resp),
                rollout_log_probs=[-2.0] * len(resp),
            )  # fmt: skip
        )
    return out


def test_draft_files_use_deepseek_mtp_names_and_round_trip(model_dir, tmp_path):
    target = load_model(model_dir).config
    draft = init_draft(target, 2, seed=3)
    names = set(draft.state_dict())
    L = target.num_hidden_layers
    for m in (L, L + 1):
        assert {
            f"model.layers.{m}.{k}.weight" for k in ("eh_proj", "enorm", "hnorm", "shared_head.norm")
        } <= names
        assert f"model.layers.{m}.self_attn.q_proj.weight" in names
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)  # shared with the target
    assert draft_shapes(target, 2) == {k: tuple(v.shape) for k, v in draft.state_dict().items()}

    save_draft(draft, tmp_path / "d")
    again = load_draft(tmp_path / "d", target, 2)
    for k, v in draft.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        load_draft(tmp_path / "d", target, 1)


def test_online_draft_training_moves_the_draft_not_the_policy(model_dir):
    actor = Actor.from_config(_cfg(model_dir, lr=3e-2))
    samples = _samples()
    policy_before = {k: v.clone() for k, v in actor.model.state_dict().items()}
    draft_before = {k: v.clone() for k, v in actor.draft.state_dict().items()}
    losses = []
    for _ in range(25):
        stats = actor.train_rollout(samples, [0.0] * len(samples))  # zero advantages: no policy gradient
        losses.append(stats.metrics["mtp_loss"])
    # (the tiny model's tied head has std 0.02 weights: logits grow only as fast as the draft's
    # output norm, so the fall is steady rather than steep)
    assert losses[-1] < losses[0] - 0.3 and losses[-1] == min(losses), losses
    for k, v in actor.model.state_dict().items():  # AdamW with zero policy gradient: no move at all
        assert torch.equal(v, policy_before[k]), k
    assert any(not torch.equal(v, draft_before[k]) for k, v in actor.draft.state_dict().items())
    assert len(actor.draft_optimizer.state) == len(list(actor.draft.parameters()))


def test_the_manifest_binds_the_draft_to_its_version(model_dir):
    cfg = _cfg(model_dir)
    actor = Actor.from_config(cfg)
    actor.train_rollout(_samples(), [0.0] * 8)
    pushed = actor.state_dict_for_sync()
    target = actor.model.config
    assert draft_shapes(target, 1).keys() <= pushed.keys()

    # The rollout side: the shapes a server under --enable-mtp-training expects (rollout/server.py).
    model = load_model(model_dir)
    expected = {
        k: tuple(v.shape) for k, v in weights_to_sync(model.state_dict(), target.tie_word_embeddings).items()
    }
    expected.update(draft_shapes(target, 1))
    engine = NativeEngine(model, [], draft=init_draft(target, 1), speculative_num_steps=2)
    stager = WeightStager(expected, current_version=0)
    manifest, chunks = pack(pushed, 1, "bf16")
    for msg in iter_messages(manifest, chunks):
        stager.add(msg)
    version, state = stager.finish()
    engine.load_weights(state, version)
    assert engine.speculator.draft_version == 1 and engine.speculator.active(1)
    for k, v in actor.draft.state_dict().items():  # the draft it drafts with is the trainer's v1 draft
        torch.testing.assert_close(engine.speculator.draft.state_dict()[k], v.to(torch.bfloat16).float())
    result = engine.generate([Request("a", [7, 8, 9], 8, temperature=1.0)])[0]
    assert set(result.versions) == {1} and engine.speculator.num_verify_steps > 0

    # A version without its draft never reaches such a server: the manifest's names do not match.
    target_only = {k: v for k, v in pushed.items() if k not in draft_shapes(target, 1)}
    manifest, _ = pack(target_only, 2, "bf16")
    with pytest.raises(WeightError):
        WeightStager(expected, current_version=1).add(next(iter_messages(manifest, [])))
    assert isinstance(actor.draft.head, DraftHead)


def test_packed_micro_batches_give_the_draft_the_same_loss(model_dir):
    padded = Actor.from_config(_cfg(model_dir))
    packed = Actor.from_config(_cfg(model_dir, use_dynamic_batch_size=True, max_tokens_per_gpu=64))
    a = padded.train_rollout(_samples(), [0.0] * 8).metrics
    b = packed.train_rollout(_samples(), [0.0] * 8).metrics
    assert b["mtp_loss"] == pytest.approx(a["mtp_loss"], rel=1e-5)
    assert b["mtp_regression_loss"] == pytest.approx(a["mtp_regression_loss"], rel=1e-5)
    for k, v in padded.draft.state_dict().items():  # and the same update
        torch.testing.assert_close(packed.draft.state_dict()[k], v, atol=1e-5, rtol=1e-4)


def test_sft_trains_the_draft_too(model_dir):
    actor = Actor.from_config(_cfg(model_dir, loss_type="sft_loss", lr=3e-2))
    draft_before = {k: v.clone() for k, v in actor.draft.state_dict().items()}
    losses = [actor.train_sft(_samples()).metrics["mtp_loss"] for _ in range(5)]
    assert losses[-1] < losses[0], losses
    assert any(not torch.equal(v, draft_before[k]) for k, v in actor.draft.state_dict().items())


def test_a_checkpoint_keeps_the_trained_draft_and_its_moments(model_dir, tmp_path):
    """A resumed --enable-mtp-training run drafts with the draft it had trained, not version 0's;
    the checkpoint's draft/ is a draft directory --speculative-draft-model-path loads."""
    from slipstream.services.trainer.checkpoint import DRAFT_DIR, load_trainer_state, save_checkpoint

    actor = Actor.from_config(_cfg(model_dir, lr=3e-2))
    samples = _samples()
    for _ in range(2):
        actor.train_rollout(samples, [0.0] * len(samples))
    ckpt = save_checkpoint(
        tmp_path, 2, actor.model, actor.optimizer, {"policy_version": 2}, draft=actor.draft_parts
    )
    trained = actor.draft.state_dict()
    served = load_draft(ckpt / DRAFT_DIR, actor.model.config, 1)
    assert all(torch.equal(v, served.state_dict()[k]) for k, v in trained.items())

    fresh = Actor.from_config(_cfg(model_dir, lr=3e-2))
    assert any(not torch.equal(v, fresh.draft.state_dict()[k]) for k, v in trained.items())
    load_trainer_state(ckpt, fresh.model, fresh.optimizer, draft=fresh.draft_parts)
    assert all(torch.equal(v, fresh.draft.state_dict()[k]) for k, v in trained.items())
    moments = [s["exp_avg_sq"] for s in actor.draft_optimizer.state.values()]
    loaded = [s["exp_avg_sq"] for s in fresh.draft_optimizer.state.values()]
    assert len(loaded) == len(moments) and all(
        torch.equal(a, b) for a, b in zip(moments, loaded, strict=True)
    )
    # the same next step from either: nothing of the draft's training was lost
    a = actor.train_rollout(samples, [0.0] * len(samples)).metrics["mtp_loss"]
    b = fresh.train_rollout(samples, [0.0] * len(samples)).metrics["mtp_loss"]
    assert a == pytest.approx(b, rel=1e-5)


def test_a_checkpoint_without_a_draft_leaves_the_draft_where_it_starts(model_dir, tmp_path, caplog):
    from slipstream.services.trainer.checkpoint import load_trainer_state, save_checkpoint

    plain = Actor.from_config(_cfg(model_dir, enable_mtp_training=False, mtp_num_layers=0))
    ckpt = save_checkpoint(tmp_path, 1, plain.model, plain.optimizer, {"policy_version": 1})
    actor = Actor.from_config(_cfg(model_dir))
    start = {k: v.clone() for k, v in actor.draft.state_dict().items()}
    with caplog.at_level("WARNING", logger="slipstream.trainer"):
        load_trainer_state(ckpt, actor.model, actor.optimizer, draft=actor.draft_parts)
    assert "no draft head there" in caplog.text
    assert all(torch.equal(v, start[k]) for k, v in actor.draft.state_dict().items())


def test_fsdp2_trains_the_draft_like_one_process(model_dir, tmp_path):
    """Under torchrun (2 gloo ranks) the replicated draft ends every step identical on both ranks
    and equal to the draft one process trains on the whole batch (summed gradients)."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    from fsdp_worker import draft_config, draft_samples

    out = tmp_path / "out"
    run_two_ranks(model_dir, out, "draft", timeout=300)
    two_ranks = load_file(str(out / "draft.safetensors"))
    saved = load_file(str(out / "ckpt" / "step_000002" / "draft" / "model.safetensors"))  # a collective save
    assert all(torch.equal(saved[k], v) for k, v in two_ranks.items())
    actor = Actor.from_config(config_from_values(draft_config(str(model_dir))))
    for _ in range(2):
        actor.train_rollout(draft_samples(), [1.0, -1.0] * 4)
    one = actor.draft.state_dict()
    assert one.keys() == two_ranks.keys()
    moved = init_draft(actor.model.config, 1).state_dict()
    assert any(not torch.equal(one[k], moved[k]) for k in one)  # the draft trained
    for k, v in one.items():  # two AdamW steps at lr 1e-2; reduction-order noise only
        torch.testing.assert_close(two_ranks[k], v, rtol=1e-3, atol=1e-4, msg=k)
