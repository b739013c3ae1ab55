"""The trainer's actor on a tiny model, without the mesh: losses, reference model, masks, staleness.

Samples are built by hand; their behaviour log-probs are the trainer's own (so the mismatch is
zero) or shifted by a known amount (so TIS/MIS have something to correct).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mesh_fixtures import build_tiny_model
from slipstream.algorithms.staleness import apply_staleness_policy
from slipstream.config import ConfigError, config_from_values
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.batch import collate
from slipstream.types import Sample, Status

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("trainer") / "model")


def _cfg(model_dir, **kw):
    values = dict(
        hf_checkpoint=str(model_dir),
        rollout_batch_size=2,
        n_samples_per_prompt=2,
        micro_batch_size=2,
        lr=1e-2,
        device="cpu",
        rollout_max_response_len=4,
    )
    values.update(kw)
    return config_from_values(values)


def _samples(n: int = 4, versions: list[list[int]] | None = None) -> list[Sample]:
    """n samples of 3 prompt + 2..4 response tokens (token ids 5..20, inside the tiny vocabulary)."""
    out = []
    for i in range(n):
        r = 2 + i % 3
        resp = [5 + (i * 3 + j) % 15 for j in range(r)]
        out.append(
            Sample(
                tokens=[7, 8, 9] + resp,
                response_length=r,
                reward=float(i % 2),
                status=Status.COMPLETED,
                policy_versions=(versions[i] if versions else [0] * r),
            )
        )
    return out


def _with_own_log_probs(actor: Actor, samples: list[Sample], shift: float = 0.0) -> list[Sample]:
    """Copies whose rollout_log_probs are the trainer's own log-probs minus `shift`."""
    batch = collate(samples, [0.0] * len(samples))
    (lp,) = actor.old_log_probs([batch])
    out = []
    for i, s in enumerate(samples):
        start = s.prompt_length - 1
        own = lp[i, start : start + s.response_length]
        out.append(dataclasses.replace(s, rollout_log_probs=(own - shift).tolist()))
    return out


def test_actor_aligned_log_probs_and_staleness_metric(model_dir):
    cfg = _cfg(model_dir)
    actor = Actor.from_config(cfg)
    samples = _with_own_log_probs(actor, _samples(versions=[[3, 3], [2, 3, 3], [3, 3, 3, 3], [3, 3]]))
    stats = actor.train_rollout(samples, [1.0, -1.0, 1.0, -1.0], trained_version=4)
    # the batch frame lines up: the trainer's recomputed log-probs are the "engine's" exactly
    assert stats.logprob_abs_diff_mean < 1e-5 and stats.metrics["logprob_abs_diff_max"] < 1e-5
    assert stats.metrics["staleness_max_trained"] == 2.0  # version 2 token trained at version 4
    assert stats.num_tokens == 2 + 3 + 4 + 2 and stats.num_optimizer_steps == 1
    assert stats.metrics["entropy"] > 0 and "kl_loss" not in stats.metrics
    assert actor.ref_model is None  # no KL term, no reference model in memory


def test_kl_loss_against_frozen_reference(model_dir):
    cfg = _cfg(model_dir, use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k3")
    actor = Actor.from_config(cfg)
    assert actor.ref_model is not None
    ref_before = {k: v.clone() for k, v in actor.ref_model.state_dict().items()}
    samples = _with_own_log_probs(actor, _samples())
    first = actor.train_rollout(samples, [1.0, -1.0, 1.0, -1.0])
    # the policy starts as the reference: KL is zero before the first update
    assert abs(first.metrics["kl_loss"]) < 1e-6
    second = actor.train_rollout(samples, [1.0, -1.0, 1.0, -1.0])
    assert second.metrics["kl_loss"] > 1e-6  # the policy moved, the reference did not
    for k, v in actor.ref_model.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    assert not any(p.requires_grad for p in actor.ref_model.parameters())


def test_stale_samples_dropped_and_offpolicy_segments_masked(model_dir):
    cfg = _cfg(model_dir, max_staleness=1, mask_offpolicy_in_partial_rollout=True)
    actor = Actor.from_config(cfg)
    raw = _with_own_log_probs(actor, _samples(versions=[[5, 5], [2, 2, 2], [4, 5, 5, 5], [5, 5]]))
    samples, report = apply_staleness_policy(
        raw, 5, max_staleness=1, policy="drop", mask_offpolicy=cfg.algo.mask_offpolicy_in_partial_rollout
    )
    assert report.hist_json() == {"0": 2, "1": 1, "3": 1} and report.num_dropped == 1
    stats = actor.train_rollout(samples, [1.0, -1.0, 1.0, -1.0], trained_version=5)
    # dropped sample (3 tokens) and the version-4 token of the partial rollout are not trained
    assert stats.num_tokens == 2 + 0 + 3 + 2
    assert stats.metrics["staleness_max_trained"] == 0.0  # nothing older than the trained version


def test_tis_and_mis_see_the_behaviour_gap(model_dir):
    cfg = _cfg(model_dir, use_tis=True, tis_clip=1.5, use_mis=True, mis_low=0.1, mis_high=10.0)
    actor = Actor.from_config(cfg)
    # behaviour log-probs 0.2 below the trainer's: rho = e^0.2 = 1.2214 on every token
    samples = _with_own_log_probs(actor, _samples(), shift=0.2)
    stats = actor.train_rollout(samples, [1.0, -1.0, 1.0, -1.0])
    assert abs(stats.tis_mean - 1.2214) < 1e-3 and abs(stats.metrics["tis_max"] - 1.2214) < 1e-3
    assert stats.metrics["tis_clipfrac"] == 0.0 and stats.metrics["mis_masked_frac"] == 0.0
    assert abs(stats.logprob_abs_diff_mean - 0.2) < 1e-4


@pytest.mark.parametrize(
    "extra",
    [
        dict(advantage_estimator="gspo", eps_clip=3e-4, eps_clip_high=4e-4),
        dict(advantage_estimator="reinforce_plus_plus", normalize_advantages=True, kl_coef=0.1, gamma=0.9),
        dict(advantage_estimator="reinforce_plus_plus_baseline", normalize_advantages=True, kl_coef=0.1),
        dict(loss_agg_mode="seq-mean-token-sum-norm", entropy_coef=0.01, use_tis=True, tis_level="sequence"),
    ],
)
def test_every_estimator_trains(model_dir, extra):
    cfg = _cfg(model_dir, **extra)
    actor = Actor.from_config(cfg)
    before = [p.detach().clone() for p in actor.model.parameters()]
    stats = actor.train_rollout(_with_own_log_probs(actor, _samples()), [1.0, 0.0, 1.0, 0.0])
    assert stats.num_optimizer_steps == 1 and torch.isfinite(torch.tensor(stats.loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, actor.model.parameters(), strict=True))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batching_does_not_change_the_step(model_dir, mode):
    """One optimizer step over 4 samples: one micro-batch of 4 or two of 2 give the same weights."""
    params = []
    for mbs in (4, 2):
        cfg = _cfg(model_dir, micro_batch_size=mbs, loss_agg_mode=mode, lr=1e-2)
        actor = Actor.from_config(cfg)
        torch.manual_seed(0)
        actor.train_rollout(_with_own_log_probs(actor, _samples()), [1.0, -1.0, 0.5, -0.5])
        params.append([p.detach().clone() for p in actor.model.parameters()])
    # AdamW divides by sqrt(v) + 1e-8, so for gradients near 1e-8 the summation-order noise of
    # a different micro-batch split becomes up to ~3e-6 in the weights (seen with 2 threads);
    # 3e-5 is 0.3% of a step.
    for a, b in zip(*params, strict=True):
        assert torch.allclose(a, b, atol=3e-5)


def test_a_warm_up_changes_nothing(model_dir):
    """The GPU loop's warm-up pass (`Actor.warm_up`) leaves the weights, the optimizer's state and
    the next step exactly as they would be without it."""
    params = []
    for warm in (False, True):
        actor = Actor.from_config(_cfg(model_dir, micro_batch_size=4, lr=1e-2))
        if warm:
            before = [p.detach().clone() for p in actor.model.parameters()]
            actor.warm_up()
            assert all(torch.equal(a, p) for a, p in zip(before, actor.model.parameters(), strict=True))
            assert all(p.grad is None for p in actor.model.parameters()) and not actor.optimizer.state
        torch.manual_seed(0)
        actor.train_rollout(_with_own_log_probs(actor, _samples()), [1.0, -1.0, 0.5, -0.5])
        params.append([p.detach().clone() for p in actor.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params, strict=True))


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(advantage_estimator="reinforce_plus_plus"), "needs --normalize-advantages"),
        (dict(use_rollout_logprobs=True, use_tis=True), "cannot go with --use-tis"),
        (dict(stale_sample_policy="correct", use_tis=False), "needs --use-tis or --use-mis"),
        (dict(use_mis=True, mis_low=2.0, mis_high=1.0), "--mis-high must exceed"),
        (dict(max_reuse=0), "--max-reuse must be at least 1"),
        (dict(kl_coef=0.1, use_kl_loss=True, kl_loss_coef=0.1), "only one of --kl-coef"),
    ],
)
def test_bad_algorithm_flags_are_one_line_errors(model_dir, extra, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(model_dir, **extra)


def test_coordinator_counters_are_read_generically():
    from slipstream.proto import coordinator_pb2
    from slipstream.services.trainer.metrics import coordinator_counters

    status = coordinator_pb2.CoordinatorStatus(
        policy_version=3, num_groups_dispatched=7, finished=True, server_versions={"a": 3}
    )
    got = coordinator_counters(status)
    assert got["coord_policy_version"] == 3 and got["coord_num_groups_dispatched"] == 7
    assert got["coord_finished"] == 1 and got["coord_num_samples_in_flight"] == 0  # zeros too
    assert "coord_server_versions" not in got  # a map is not a counter
    assert all(isinstance(v, int | float) for v in got.values())


def test_a_non_finite_step_is_skipped_and_leaves_weights_and_moments_alone(model_dir):
    actor = Actor.from_config(_cfg(model_dir))
    samples = _with_own_log_probs(actor, _samples())
    actor.train_rollout(samples, [1.0, -1.0, 0.5, -0.5])  # AdamW has moments now
    weights = {k: v.clone() for k, v in actor.model.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in zip(weights, actor.optimizer.state.values(), strict=False)}

    stats = actor.train_rollout(samples, [float("nan"), -1.0, 0.5, -0.5])

    assert stats.num_skipped_steps == 1 and stats.num_optimizer_steps == 0
    for k, v in actor.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for (k, m), state in zip(moments.items(), actor.optimizer.state.values(), strict=False):
        assert torch.equal(state["exp_avg"], m), k
    healthy = actor.train_rollout(samples, [1.0, -1.0, 0.5, -0.5])
    assert healthy.num_skipped_steps == 0 and healthy.num_optimizer_steps == 1


def test_gradient_checkpointing_and_bf16_master_weights(model_dir):
    """Recomputing layers in backward gives the same step; --bf16 keeps float32 master weights."""
    params = []
    for extra in ({}, dict(gradient_checkpointing=True)):
        actor = Actor.from_config(_cfg(model_dir, **extra))
        actor.train_rollout(_with_own_log_probs(actor, _samples()), [1.0, -1.0, 0.5, -0.5])
        params.append([p.detach().clone() for p in actor.model.parameters()])
    for a, b in zip(*params, strict=True):
        assert torch.allclose(a, b, atol=3e-5)
    actor = Actor.from_config(_cfg(model_dir, bf16=True, dtype="bfloat16", lr=1e-6))
    before = [p.detach().clone() for p in actor.model.parameters()]
    assert all(p.dtype == torch.float32 for p in before)
    stats = actor.train_rollout(_with_own_log_probs(actor, _samples()), [1.0, -1.0, 0.5, -0.5])
    assert stats.num_optimizer_steps == 1 and torch.isfinite(torch.tensor(stats.loss))
    # a 1e-6 step survives in float32 (bf16 parameters would have rounded most of it away)
    moved = sum(int((a != b).sum()) for a, b in zip(before, actor.model.parameters(), strict=True))
    assert moved > 0.5 * sum(p.numel() for p in before)
