"""`--bf16` as bf16 compute weights over fp32 masters (`services/trainer/precision.py`).

The references are computed here: an all-fp32 step, and the trainer's previous `--bf16` (fp32
parameters under bf16 autocast, which the actor no longer carries: `_autocast_step` runs the
fp32 actor's step under `torch.autocast`, the same casts the old path made around its forwards).

Measured tolerance (this file's model, one AdamW step, CPU): the step's fp32 gradient differs
from the all-fp32 path's by ~0.8% (relative L2) with bf16 compute weights and by ~0.7% under
the previous autocast path; the two bf16 paths differ from each other by ~0.9%. The weights
after the step differ by ~11% relative to the step itself, for either bf16 path against fp32
and for the two against each other: AdamW's first step is lr * sign(gradient), so bf16 noise
flips the sign of near-zero gradients, and no weight can differ by more than 2 * lr.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_trainer import _samples

from mesh_fixtures import build_tiny_model
from slipstream.config import config_from_values
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.batch import collate
from slipstream.services.trainer.checkpoint import load_trainer_state, resolve_checkpoint, save_checkpoint

torch.set_num_threads(1)
LR = 1e-3
SCORES = [1.0, -1.0, 0.5, -0.5]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(
        tmp_path_factory.mktemp("precision") / "model", hidden_size=64, intermediate_size=128
    )


def _cfg(model_dir, **kw):
    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=2, n_samples_per_prompt=2, micro_batch_size=2,
        lr=LR, device="cpu", rollout_max_response_len=4,
    )  # fmt: skip
    values.update(kw)
    return config_from_values(values)


def _with_own_log_probs(actor: Actor, samples: list) -> list:
    """Copies whose rollout_log_probs are the actor's own (on whatever device it runs)."""
    (lp,) = actor.old_log_probs([collate(samples, [0.0] * len(samples)).to(actor.device)])
    return [
        dataclasses.replace(s, rollout_log_probs=lp[i, s.prompt_length - 1 :][: s.response_length].tolist())
        for i, s in enumerate(samples)
    ]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in tensors])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _step(actor: Actor, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight update, fp32 gradient) of one optimizer step."""
    before = _flat(actor.model.parameters())
    stats = actor.train_rollout(samples, SCORES)
    assert stats.num_optimizer_steps == 1
    return _flat(actor.model.parameters()) - before, _flat(p.grad for p in actor.model.parameters())


def _autocast_step(actor: Actor, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """`_step` of an fp32 actor under bf16 autocast: the `--bf16` the trainer had before."""
    with torch.autocast(actor.device.type, dtype=torch.bfloat16):
        return _step(actor, samples)


def _assert_compute_is_rounded_masters(actor: Actor) -> None:
    for (name, m), c in zip(actor.model.named_parameters(), actor.compute.parameters(), strict=True):
        assert m.dtype == torch.float32 and c.dtype == torch.bfloat16, name
        assert torch.equal(c, m.to(torch.bfloat16)), name
        assert c.grad is None, name  # bf16 gradients are only staging buffers


def test_bf16_compute_weights_step_like_the_autocast_path(model_dir):
    fp32 = Actor.from_config(_cfg(model_dir))
    samples = _with_own_log_probs(fp32, _samples())
    ref_step, ref_grad = _step(fp32, samples)
    auto_step, auto_grad = _autocast_step(Actor.from_config(_cfg(model_dir)), samples)
    actor = Actor.from_config(_cfg(model_dir, bf16=True))
    assert actor.compute is not actor.model
    step, grad = _step(actor, samples)
    _assert_compute_is_rounded_masters(actor)

    # Gradients: bf16 noise, no worse than autocast's (measured 0.84% vs 0.69%, 0.93% apart).
    assert _rel(grad, ref_grad) < 2e-2 and _rel(grad, ref_grad) < 2 * _rel(auto_grad, ref_grad)
    assert _rel(grad, auto_grad) < 2e-2
    # Weights after the step (measured 11% of the step apart, as autocast is from fp32: sign flips).
    assert _rel(step, auto_step) < 0.2 and _rel(step, ref_step) < 2 * _rel(auto_step, ref_step) + 0.05
    assert float((step - auto_step).abs().max()) <= 2 * LR * 1.001


def test_checkpoint_round_trip_keeps_the_fp32_masters(model_dir, tmp_path):
    actor = Actor.from_config(_cfg(model_dir, bf16=True))
    samples = _with_own_log_probs(actor, _samples())
    actor.train_rollout(samples, SCORES)
    save_checkpoint(tmp_path, 1, actor.model, actor.optimizer, {"policy_version": 1})

    fresh = Actor.from_config(_cfg(model_dir, bf16=True))
    load_trainer_state(resolve_checkpoint(str(tmp_path)), fresh.model, fresh.optimizer)
    for (n, a), b in zip(actor.model.named_parameters(), fresh.model.parameters(), strict=True):
        assert b.dtype == torch.float32 and torch.equal(a, b), n
    assert all(v.dtype == torch.float32 for v in fresh.state_dict_for_sync().values())
    # The next forward picks the loaded masters up; the next step is the uninterrupted one.
    torch.manual_seed(0)
    actor.train_rollout(samples, SCORES)
    torch.manual_seed(0)
    fresh.train_rollout(samples, SCORES)
    _assert_compute_is_rounded_masters(fresh)
    for (n, a), b in zip(actor.model.named_parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_a_skipped_step_leaves_masters_moments_and_bf16_weights_alone(model_dir):
    actor = Actor.from_config(_cfg(model_dir, bf16=True))
    samples = _with_own_log_probs(actor, _samples())
    actor.train_rollout(samples, SCORES)
    masters = [p.detach().clone() for p in actor.model.parameters()]
    compute = [p.detach().clone() for p in actor.compute.parameters()]
    moments = [s["exp_avg"].clone() for s in actor.optimizer.state.values()]

    stats = actor.train_rollout(samples, [float("nan"), -1.0, 0.5, -0.5])

    assert stats.num_skipped_steps == 1 and stats.num_optimizer_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(masters, actor.model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(compute, actor.compute.parameters(), strict=True))
    assert all(
        torch.equal(m, s["exp_avg"]) for m, s in zip(moments, actor.optimizer.state.values(), strict=True)
    )
    assert all(p.grad is None for p in actor.compute.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_compute_weights_on_gpu_packed_and_padded(tmp_path):
    """On the GPU (fused AdamW, FlashAttention varlen): bf16 compute weights against autocast."""
    d = build_tiny_model(tmp_path / "m", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64)  # fmt: skip
    grads = {}
    for name, kw, autocast in (
        ("autocast", {}, True),
        ("bf16w", {}, False),
        ("bf16w-packed", dict(use_dynamic_batch_size=True, max_tokens_per_gpu=64), False),
        (
            "bf16w-packed-compiled",
            dict(use_dynamic_batch_size=True, max_tokens_per_gpu=64, torch_compile=True),
            False,
        ),
    ):
        actor = Actor.from_config(_cfg(d, bf16=not autocast, device="cuda", clip_grad=1e9, **kw))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):  # the old --bf16
            samples = _with_own_log_probs(actor, _samples())
            before = _flat(actor.model.parameters())
            stats = actor.train_rollout(samples, SCORES)
        grads[name] = _flat(p.grad for p in actor.model.parameters())
        assert (
            stats.num_optimizer_steps == 1 and torch.isfinite(_flat(actor.model.parameters()) - before).all()
        )
        # compiled, the proximal forward runs the training graph: the first step's ratio is exactly 1
        kl = abs(stats.metrics["ppo_kl"])
        assert kl == 0.0 if "compiled" in name else kl < 1e-3, (name, kl)
        if not autocast:
            _assert_compute_is_rounded_masters(actor)
    assert _rel(grads["bf16w"], grads["autocast"]) < 3e-2
    assert _rel(grads["bf16w-packed"], grads["bf16w"]) < 3e-2
    assert _rel(grads["bf16w-packed-compiled"], grads["bf16w-packed"]) < 3e-2


@pytest.mark.parametrize(
    "extra", [{}, dict(global_batch_size=2, use_tis=True)], ids=["one-step", "two-steps"]
)
def test_first_step_proximal_log_probs_come_from_its_own_forward(model_dir, extra):
    """Until the first optimizer step the proximal log-probs are the training forward's, bit for
    bit (no separate no-grad forward, which rounds differently): that step's ratio is exactly 1.
    Later steps' micro-batches still get theirs from the weights before the rollout's first step."""
    actor = Actor.from_config(_cfg(model_dir, **extra))
    stats = actor.train_rollout(_with_own_log_probs(actor, _samples()), SCORES)
    assert stats.num_optimizer_steps == (1 if not extra else 2)
    if not extra:
        assert stats.metrics["ppo_kl"] == 0.0 and stats.pg_clipfrac == 0.0
    else:  # the second step's ratio is against the weights before the first: not 1
        assert stats.metrics["ppo_kl"] != 0.0
