"""Mixture-of-experts routing in the trainer (services/trainer/routing.py): R3, R2, aux loss, metrics.

The "rollout" here is a copy of the policy whose weights moved a little (as bf16 rounding or a
stale version moves them): it routes some token-layers differently and reports its own log-probs
and the experts it chose for every input position, prompt included, exactly as the engine does.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mesh_fixtures import build_tiny_model
from slipstream.config import ConfigError, config_from_values
from slipstream.models import Routing, load_balancing_loss, load_model
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.batch import collate, pack
from slipstream.services.trainer.compiled_layers import split_layers
from slipstream.types import Sample, Status

torch.set_num_threads(1)
MOE = dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
           norm_topk_prob=True, num_hidden_layers=2)  # fmt: skip
SCORES = [1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("moe") / "model", seed=3, **MOE)


def _cfg(model_dir, **kw):
    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=2, n_samples_per_prompt=4, micro_batch_size=4,
        lr=1e-2, device="cpu", rollout_max_response_len=10, moe_aux_loss_coeff=0.0,
    )  # fmt: skip
    values.update(kw)
    return config_from_values(values)


def _samples(n: int = 8) -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        p, r = 3 + i % 4, 2 + (i * 5) % 9
        toks = torch.randint(5, 20, (p + r,), generator=g).tolist()
        out.append(Sample(tokens=toks, response_length=r, reward=float(i % 2), status=Status.COMPLETED,
                          policy_versions=[0] * r))  # fmt: skip
    return out


@torch.no_grad()
def _rollout(model_dir, samples: list[Sample], noise: float = 0.03) -> list[Sample]:
    """Samples as a rollout engine with slightly different weights reports them: its log-probs and
    the experts it routed every fed position to (len(tokens) - 1 rows of layers x top-k)."""
    model = load_model(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    for p in model.parameters():
        p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    out = []
    for s in samples:
        ids = torch.tensor(s.tokens)[None]
        routing = Routing()
        logp = model(ids[:, :-1], routing=routing).log_softmax(-1)[0]
        start = s.prompt_length - 1
        lp = logp[start : start + s.response_length].gather(-1, ids[0, s.prompt_length :, None])[:, 0]
        rows = routing.stacked()[0].reshape(len(s.tokens) - 1, -1).tolist()
        out.append(dataclasses.replace(s, rollout_log_probs=lp.tolist(), rollout_routed_experts=rows))
    return out


def test_r3_replays_the_rollout_experts_and_narrows_the_gap(model_dir):
    samples = _rollout(model_dir, _samples())
    samples = samples[4:] + samples[:4]  # the probe (the first 4) then holds tokens routed differently
    own = Actor.from_config(_cfg(model_dir)).train_rollout(samples, SCORES)
    r3 = Actor.from_config(_cfg(model_dir, use_rollout_routing_replay=True)).train_rollout(samples, SCORES)
    # without replay the trainer's router disagrees with the rollout's somewhere
    assert own.metrics["moe_routing_agreement"] == own.metrics["moe_router_agreement"] < 1.0
    # with it every token-layer trains on the rollout's experts, while its router would have chosen
    # what the one without replay chose (same weights, same inputs)
    assert r3.metrics["moe_routing_agreement"] == 1.0
    assert r3.metrics["moe_router_agreement"] == own.metrics["moe_router_agreement"]
    assert r3.logprob_abs_diff_mean < own.logprob_abs_diff_mean
    # the same gap on the probe, with and without replay, measured in the R3 run itself
    assert r3.metrics["moe_logprob_abs_diff_replay"] < r3.metrics["moe_logprob_abs_diff_no_replay"]
    assert "moe_logprob_abs_diff_no_replay" not in own.metrics
    assert r3.metrics["moe_expert_load_max"] >= 1.0


def test_r3_gate_weights_come_from_the_router_so_it_trains(model_dir):
    samples = _rollout(model_dir, _samples())
    actor = Actor.from_config(_cfg(model_dir, use_rollout_routing_replay=True))
    gate = actor.model.model.layers[0].mlp.gate.weight
    before = gate.detach().clone()
    actor.train_rollout(samples, SCORES)
    assert not torch.equal(before, gate.detach())


@pytest.mark.parametrize("flags", [{}, dict(use_dynamic_batch_size=True, max_tokens_per_gpu=40)])
def test_packed_and_padded_replay_alike(model_dir, flags):
    """The records land on the packed row's positions: same log-probs, agreement 1.0 both ways."""
    samples = _rollout(model_dir, _samples())
    stats = Actor.from_config(_cfg(model_dir, use_rollout_routing_replay=True, **flags)).train_rollout(
        samples, SCORES
    )
    assert stats.metrics["moe_routing_agreement"] == 1.0
    padded = collate(samples, SCORES)
    packed = pack(samples, SCORES)
    actor = Actor.from_config(_cfg(model_dir, use_rollout_routing_replay=True))
    with torch.no_grad():
        lp_padded = actor.log_probs(padded)
        lp_packed = actor.log_probs(packed)
    torch.testing.assert_close(lp_packed, lp_padded * (padded.loss_mask > 0), atol=1e-5, rtol=0)


def test_a_sample_without_record_routes_itself(model_dir):
    samples = _rollout(model_dir, _samples())
    samples[0] = dataclasses.replace(samples[0], rollout_routed_experts=None)
    batch = collate(samples[:4], SCORES[:4])
    assert (batch.routed_experts[0] == -1).all() and (
        batch.routed_experts[1, : len(samples[1].tokens) - 1] >= 0
    ).all()
    actor = Actor.from_config(_cfg(model_dir, use_rollout_routing_replay=True))
    with torch.no_grad():
        replayed = actor.log_probs(batch)
        own = Actor.from_config(_cfg(model_dir)).log_probs(batch)
    torch.testing.assert_close(replayed[0], own[0], atol=0, rtol=0)  # sample 0 routed itself


def test_r2_replays_the_proximal_pass_in_the_training_pass(model_dir):
    """Two optimizer steps of 4: the second's micro-batch has its proximal pass before the first
    step moved the weights. Its records are the initial weights' routing, so only R2, which trains
    it on the proximal pass's experts, agrees with them everywhere."""
    samples = _rollout(model_dir, _samples(), noise=0.0)  # the records: what the initial weights route
    got = {}
    for replay in (False, True):
        cfg = _cfg(model_dir, global_batch_size=4, lr=0.2, use_routing_replay=replay)
        got[replay] = Actor.from_config(cfg).train_rollout(samples, SCORES)
    assert got[False].num_optimizer_steps == 2
    assert got[True].metrics["moe_routing_agreement"] == 1.0
    assert got[False].metrics["moe_routing_agreement"] < 1.0


def test_aux_loss_is_added_with_its_coefficient(model_dir):
    samples = _rollout(model_dir, _samples())
    base = Actor.from_config(_cfg(model_dir, global_batch_size=8, micro_batch_size=4))
    with_aux = Actor.from_config(
        _cfg(model_dir, global_batch_size=8, micro_batch_size=4, moe_aux_loss_coeff=0.5)
    )
    batches = [collate(samples[:4], SCORES[:4]), collate(samples[4:], SCORES[4:])]
    with torch.no_grad():
        routings = [Routing(keep_router_logits=True) for _ in batches]
        for b, r in zip(batches, routings, strict=True):
            with_aux.compute(b.input_ids, routing=r)
        real = [torch.arange(b.input_ids.shape[1])[None] < b.seq_lens[:, None] for b in batches]
        aux = [
            load_balancing_loss(r.router_logits, 8, 2, mask=m.reshape(-1))
            for r, m in zip(routings, real, strict=True)
        ]
    tokens = [b.num_tokens for b in batches]
    expected_aux = sum(a * n for a, n in zip(aux, tokens, strict=True)) / sum(tokens)
    s0, s1 = base.train_rollout(samples, SCORES), with_aux.train_rollout(samples, SCORES)
    assert s1.metrics["moe_aux_loss"] == pytest.approx(float(expected_aux), rel=1e-5)
    assert "moe_aux_loss" not in s0.metrics
    # token-mean: each micro-batch's term is weighted by its share of the step's tokens
    assert s1.loss - s0.loss == pytest.approx(0.5 * float(expected_aux), rel=1e-4, abs=1e-6)


def test_default_coefficient_is_the_checkpoints(model_dir):
    actor = Actor.from_config(_cfg(model_dir, moe_aux_loss_coeff=None))
    assert actor.moe.aux_coef == actor.model.config.router_aux_loss_coef == 0.001


def test_split_layers_pass_the_routing(model_dir):
    """--torch-compile's split layer forward (uncompiled here) replays and captures like the model's."""
    model = load_model(model_dir, dtype=torch.float32)
    ids = torch.randint(5, 20, (2, 9), generator=torch.Generator().manual_seed(2))
    captured = Routing()
    with torch.no_grad():
        want = model(ids, routing=captured)
        other = [(e + 1) % 8 for e in captured.experts]
        want_other = model(ids, routing=Routing(replay=other))
        split_layers(model, compile=False)
        again = Routing()
        got = model(ids, routing=again)
        got_other = model(ids, routing=Routing(replay=other))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got_other, want_other, atol=0, rtol=0)
    assert torch.equal(again.stacked(), captured.stacked())


def test_gradient_checkpointing_keeps_the_replay(model_dir):
    samples = _rollout(model_dir, _samples())
    stats = Actor.from_config(
        _cfg(model_dir, use_rollout_routing_replay=True, gradient_checkpointing=True)
    ).train_rollout(samples, SCORES)
    assert stats.metrics["moe_routing_agreement"] == 1.0 and stats.num_optimizer_steps == 1


@pytest.mark.parametrize("flag", ["use_rollout_routing_replay", "use_routing_replay"])
def test_a_dense_model_refuses_replay(tmp_path, flag):
    dense = build_tiny_model(tmp_path / "dense")
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} needs a mixture-of-experts model"):
        Actor.from_config(_cfg(dense, **{flag: True}))


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(use_rollout_routing_replay=True, loss_type="sft_loss"), "sft_loss has neither"),
        (dict(use_routing_replay=True, loss_type="sft_loss"), "sft_loss has neither"),
        (
            dict(use_routing_replay=True, use_rollout_logprobs=True, use_tis=False),
            "which --use-rollout-logprobs skips",
        ),
        (dict(moe_aux_loss_coeff=-1.0), "--moe-aux-loss-coeff must be >= 0"),
    ],
)
def test_replay_flags_that_could_do_nothing_are_refused(model_dir, extra, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(model_dir, **extra)
