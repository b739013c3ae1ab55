"""Sequence packing (`--use-dynamic-batch-size --max-tokens-per-gpu`) against the padded path.

Packing changes how the forward sees a micro-batch (one row, positions restarting per sequence,
attention confined to each sequence) and nothing else: the log-probs, the loss, every metric and
the weights after an optimizer step must be the padded path's. On the CPU the packed attention is
the per-sequence SDPA fallback; on a GPU the FlashAttention varlen kernel is pinned to it.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from mesh_fixtures import build_tiny_model
from slipstream.config import ConfigError, config_from_values
from slipstream.models.packed import packed_causal_attention
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.batch import collate, first_fit, pack, split_for_ranks
from slipstream.types import Sample, Status

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("packing") / "model")


def _cfg(model_dir, **kw):
    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=2, n_samples_per_prompt=4, micro_batch_size=4,
        lr=1e-2, device="cpu", rollout_max_response_len=10,
    )  # fmt: skip
    values.update(kw)
    return config_from_values(values)


def _samples(n: int = 8) -> list[Sample]:
    """Prompts of 3..6 and responses of 2..10 tokens (ids 5..19, inside the tiny vocabulary)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        p, r = 3 + i % 4, 2 + (i * 5) % 9
        toks = torch.randint(5, 20, (p + r,), generator=g).tolist()
        out.append(Sample(tokens=toks, response_length=r, reward=float(i % 2), status=Status.COMPLETED,
                          policy_versions=[0] * r))  # fmt: skip
    out[3] = dataclasses.replace(out[3], status=Status.FAILED)  # trains nothing, still packed
    return out


def _with_rollout_log_probs(actor: Actor, samples: list[Sample], shift: float = 0.1) -> list[Sample]:
    (lp,) = actor.old_log_probs([collate(samples, [0.0] * len(samples))])
    return [
        dataclasses.replace(
            s, rollout_log_probs=(lp[i, s.prompt_length - 1 : s.prompt_length - 1 + s.response_length] - shift).tolist()
        )
        for i, s in enumerate(samples)
    ]  # fmt: skip


def test_first_fit_respects_the_budget_and_keeps_order():
    bins = first_fit([5, 9, 3, 12, 4, 1], max_tokens=10)
    assert bins == [[0, 2, 5], [1], [3], [4]]  # 12 > 10 sits alone; 4 no longer fits bin 0 (5+3+1)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert split_for_ranks([[0, 1, 2], [3]], [4, 4, 4, 9], world=2) == [[0, 1, 2], [3]]
    assert split_for_ranks([[0, 1, 2]], [4, 4, 4], world=2) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="cannot be shared evenly"):
        split_for_ranks([[0]], [4], world=2)


def test_pack_layout():
    samples = _samples(4)
    b = pack(samples, [1.0, 2.0, 3.0, 4.0])
    p = b.packed
    lengths = [len(s.tokens) - 1 for s in samples]
    assert p.input_ids.shape == (1, sum(lengths))
    order = p.order.tolist()
    assert sorted(order) == list(range(4)) and [lengths[i] for i in order] == sorted(
        lengths
    )  # shortest first
    assert p.cu_seqlens.tolist() == [0, *torch.tensor([lengths[i] for i in order]).cumsum(0).tolist()]
    for k, i in enumerate(order):
        start = int(p.cu_seqlens[k])
        assert p.input_ids[0, start : start + lengths[i]].tolist() == samples[i].tokens[:-1]
        assert p.positions[0, start : start + lengths[i]].tolist() == list(range(lengths[i]))
    # the head reads exactly the trainable response positions, predicting the right tokens
    assert len(p.head_rows) == sum(s.response_length for s in samples if s.status is not Status.FAILED)
    assert torch.equal(p.head_targets, b.targets.reshape(-1)[p.head_index])
    assert torch.equal(p.input_ids[0, p.head_rows], b.input_ids.reshape(-1)[p.head_index])


def test_collate_puts_each_field_where_its_tokens_are():
    """Every row of the padded frame, field by field, against the sample it came from: failed and
    empty samples train nothing, a sample without a per-token field gets the field's fill."""
    samples = _samples(8)
    samples[1] = dataclasses.replace(samples[1], response_length=0, policy_versions=None)
    samples[2] = dataclasses.replace(
        samples[2],
        loss_mask=[1, 0] * (samples[2].response_length // 2) + [1] * (samples[2].response_length % 2),
        rollout_log_probs=None,
    )
    samples[5] = dataclasses.replace(
        samples[5], policy_versions=None, rollout_log_probs=[-0.5] * samples[5].response_length
    )
    advantages = [float(i) - 3.5 for i in range(8)]
    b = collate(samples, advantages, pad_id=-7)
    width = max(len(s.tokens) for s in samples) - 1
    assert b.input_ids.shape == (8, width) and b.seq_lens.tolist() == [len(s.tokens) - 1 for s in samples]
    for i, s in enumerate(samples):
        n, r, first = len(s.tokens) - 1, s.response_length, s.prompt_length - 1
        assert b.input_ids[i].tolist() == s.tokens[:-1] + [-7] * (width - n)
        assert b.targets[i].tolist() == s.tokens[1:] + [-7] * (width - n)
        trained = s.status is not Status.FAILED and r > 0
        response = slice(first, first + r) if trained else slice(0, 0)
        expect = {
            "loss_mask": ([1.0] * r if s.loss_mask is None else s.loss_mask, 0.0),
            "rollout_log_probs": ([0.0] * r if s.rollout_log_probs is None else s.rollout_log_probs, 0.0),
            "advantages": ([advantages[i]] * r, 0.0),
            "versions": ([-1] * r if s.policy_versions is None else s.policy_versions, -1),
        }
        for field, (values, fill) in expect.items():
            row = getattr(b, field)[i].tolist()
            assert row[response] == (values if trained else []), (i, field)
            outside = row[: response.start] + row[response.stop :] if trained else row
            assert set(outside) <= {fill}, (i, field)
    assert b.num_tokens == int(b.loss_mask.sum())
    with pytest.raises(ValueError, match="sample .* 3 entries, its response"):
        collate([dataclasses.replace(samples[0], loss_mask=[1, 1, 1], response_length=4)], [0.0])


def test_packed_attention_fallback_is_per_sequence_causal():
    """The CPU fallback runs each run of equal lengths as one batch (3 3 and 5 5 are runs; the
    last 3 is not next to them): every sequence still attends causally inside itself only,
    forward and backward."""
    torch.manual_seed(0)
    lengths = [3, 3, 7, 5, 5, 1, 3]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    n_tok = sum(lengths)
    q, k, v = (torch.randn(1, h, n_tok, 8, requires_grad=True) for h in (4, 2, 2))
    cu = torch.tensor([*starts, n_tok], dtype=torch.int32)
    out = packed_causal_attention(cu, 7)(0, q, k, v)
    want = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, s : s + n], k[:, :, s : s + n], v[:, :, s : s + n], is_causal=True, enable_gqa=True
            )
            for s, n in zip(starts, lengths, strict=True)
        ],
        dim=2,
    )
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, ref in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, ref)


def test_packed_log_probs_equal_padded(model_dir):
    actor = Actor.from_config(_cfg(model_dir))
    samples = _samples()
    padded, packed = collate(samples, [0.0] * 8), pack(samples, [0.0] * 8)
    (lp_pad,), (lp_pack,) = actor.old_log_probs([padded]), actor.old_log_probs([packed])
    mask = padded.loss_mask > 0
    assert mask.sum() > 20
    torch.testing.assert_close(lp_pack[mask], lp_pad[mask], atol=1e-5, rtol=0)
    assert (lp_pack[~mask] == 0).all()  # the head ran on response positions only


@pytest.mark.parametrize(
    "extra",
    [
        dict(loss_agg_mode="token-mean"),
        dict(loss_agg_mode="seq-mean-token-mean", use_tis=True, entropy_coef=0.01),
        dict(advantage_estimator="gspo", global_batch_size=4, use_kl_loss=True, kl_loss_coef=0.1),
    ],
    ids=["token-mean", "seq-mean+tis+entropy", "gspo+kl+2-steps"],
)
def test_one_step_packed_equals_padded(model_dir, extra):
    """The same optimizer step(s) padded and packed: same weights, loss and metrics."""
    results = []
    for packed in (False, True):
        flags = dict(use_dynamic_batch_size=True, max_tokens_per_gpu=24) if packed else {}
        actor = Actor.from_config(_cfg(model_dir, **extra, **flags))
        samples = _with_rollout_log_probs(actor, _samples())
        if packed:
            members, steps = actor.micro_batches(samples)
            assert len(members) > len(steps)  # the budget really cut steps into several packed rows
            assert all(sum(len(samples[i].tokens) - 1 for i in m) <= 24 for m in members)
        stats = actor.train_rollout(samples, [0.5, -1.0, 1.0, 0.0, -0.5, 1.5, -1.5, 0.25])
        results.append((stats, [p.detach().clone() for p in actor.model.parameters()]))
    (s_pad, w_pad), (s_pack, w_pack) = results
    assert s_pack.num_optimizer_steps == s_pad.num_optimizer_steps >= 1
    assert s_pack.num_tokens == s_pad.num_tokens
    assert s_pack.loss == pytest.approx(s_pad.loss, abs=1e-6)
    assert s_pack.grad_norm == pytest.approx(s_pad.grad_norm, rel=1e-4)
    assert s_pack.pg_clipfrac == pytest.approx(s_pad.pg_clipfrac, abs=1e-6)
    assert s_pack.logprob_abs_diff_mean == pytest.approx(s_pad.logprob_abs_diff_mean, abs=1e-6)
    assert s_pack.metrics.keys() == s_pad.metrics.keys()
    for k in s_pad.metrics:
        assert s_pack.metrics[k] == pytest.approx(s_pad.metrics[k], abs=1e-5), k
    # AdamW's first step moves each weight by ~lr * sign(g) = 1e-2, and a different summation
    # order is amplified where |g| is near AdamW's eps. Measured noise floor: padded with
    # micro-batches of 4 vs 2 differ by up to 8.7e-6; packed vs padded by up to 1.25e-5 (the
    # GSPO case, two steps). 3e-5 is 0.3% of a step; a wrong position or mask moves far more.
    worst = max(float((a - b).abs().max()) for a, b in zip(w_pad, w_pack, strict=True))
    assert worst < 3e-5


def test_dynamic_batch_size_needs_a_budget(model_dir):
    with pytest.raises(ConfigError, match="needs a positive --max-tokens-per-gpu"):
        _cfg(model_dir, use_dynamic_batch_size=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_kernel_matches_the_fallback_on_gpu():
    torch.manual_seed(0)
    lengths = [100, 37, 300, 1]
    n = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (
        torch.randn(1, h, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (16, 8, 8)
    )
    fast = packed_causal_attention(cu, max(lengths))(0, q, k, v)
    slow = packed_causal_attention(cu, max(lengths), use_kernel=False)(0, q, k, v)
    torch.testing.assert_close(fast, slow, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, (q, k, v), g)
    grads_slow = torch.autograd.grad(slow, (q, k, v), g)
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_split_layers_forward_is_the_models_own(model_dir, packed):
    """`--torch-compile`'s layer split (before -> attention -> after), uncompiled: bit for bit the
    model's own forward and gradients (on the GPU the same functions run compiled)."""
    from slipstream.services.trainer.compiled_layers import split_layers

    samples = _samples()
    batch = (pack if packed else collate)(samples, [0.0] * 8)
    results = []
    for split in (False, True):
        actor = Actor.from_config(_cfg(model_dir))
        if split:
            split_layers(actor.compute, compile=False)
        lp = actor.log_probs(batch)
        lp.sum().backward()
        results.append((lp.detach(), [p.grad for p in actor.model.parameters()]))
    (lp_a, g_a), (lp_b, g_b) = results
    assert torch.equal(lp_a, lp_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b, strict=True))


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_proximal_log_probs_are_the_training_forwards(model_dir):
    """Under --torch-compile (bf16) the proximal log-probs come from the training graph itself: a
    no-grad graph is fused differently and rounds elsewhere, and the first step's ratio would not
    be 1 (on the H200 benchmark's model that made a first-step loss of 0.7 instead of 0)."""
    cfg = _cfg(model_dir, bf16=True, torch_compile=True, use_dynamic_batch_size=True, max_tokens_per_gpu=24)
    actor = Actor.from_config(cfg)
    stats = actor.train_rollout(_samples(), [0.5, -1.0, 1.0, 0.0, -0.5, 1.5, -1.5, 0.25])
    assert stats.metrics["ppo_kl"] == 0.0 and stats.pg_clipfrac == 0.0
