"""Advantages and losses against values worked out by hand on tiny tensors (arithmetic in comments)."""

import math

import pytest
import torch

from slipstream.algorithms import (
    apply_staleness_policy,
    approx_kl,
    behaviour_correction,
    chunked_log_probs_and_entropy,
    chunked_token_log_probs,
    entropy_from_logits,
    group_scores,
    grpo_advantages,
    loss_token_weights,
    masked_mean,
    masked_whiten,
    policy_loss,
    reinforce_plus_plus_baseline_advantages,
    reinforce_plus_plus_returns,
    step_totals,
    token_log_probs,
)
from slipstream.types import Sample, Status

torch.set_num_threads(1)


def _close(a, b, tol=1e-5):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol
    )


# ---- advantages -------------------------------------------------------------------------------


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    adv = grpo_advantages(rewards)
    # Group 0: mean 0.5, centered ±0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735
    #          -> ±0.5 / 0.57735 = ±0.866025 (eps 1e-6 is below the tolerance).
    # Group 1: all equal -> centered 0, std 0 -> 0 / (0 + eps) = 0 (not NaN).
    # Group 2: mean 0.75, centered [-0.75, -0.75, -0.75, 2.25], var = (3 * 0.5625 + 5.0625) / 3
    #          = 2.25, std 1.5 -> [-0.5, -0.5, -0.5, 1.5].
    s = 0.5 / math.sqrt(1 / 3)
    expected = [[s, -s, -s, s], [0.0, 0.0, 0.0, 0.0], [-0.5, -0.5, -0.5, 1.5]]
    assert adv.dtype == torch.float32 and _close(adv, expected)


def test_grpo_advantages_without_std_and_with_one_sample():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    assert _close(
        grpo_advantages(rewards, normalize_std=False), [[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]]
    )
    # n = 1: reward minus its own mean is 0; the undefined std must not turn it into NaN.
    assert torch.equal(grpo_advantages(torch.tensor([[3.0], [-1.0]])), torch.zeros(2, 1))


# ---- log-probs and entropy --------------------------------------------------------------------

# logits [0, ln 2, ln 3] -> softmax [1/6, 2/6, 3/6]
LOGITS = torch.tensor([[[0.0, math.log(2), math.log(3)], [5.0, 5.0, 5.0]]])  # [B=1, T=2, V=3]


def test_token_log_probs_by_hand():
    targets = torch.tensor([[2, 0]])
    # token 0: p(2) = 3/6 -> ln 0.5; token 1: uniform -> ln(1/3)
    assert _close(token_log_probs(LOGITS, targets), [[math.log(0.5), math.log(1 / 3)]])
    # temperature 2: logits / 2 = [0, ln √2, ln √3] -> p(2) = √3 / (1 + √2 + √3)
    p2 = math.sqrt(3) / (1 + math.sqrt(2) + math.sqrt(3))
    assert _close(token_log_probs(LOGITS, targets, temperature=2.0), [[math.log(p2), math.log(1 / 3)]])
    # temperature 0 (greedy sampling) is treated as 1
    assert torch.equal(token_log_probs(LOGITS, targets, 0.0), token_log_probs(LOGITS, targets, 1.0))


def test_token_log_probs_are_fp32_for_bf16_logits():
    out = token_log_probs(LOGITS.bfloat16(), torch.tensor([[2, 0]]))
    assert out.dtype == torch.float32
    assert _close(out, [[math.log(0.5), math.log(1 / 3)]], tol=1e-2)


def test_entropy_by_hand():
    # token 0: H = -(1/6 ln 1/6 + 1/3 ln 1/3 + 1/2 ln 1/2) = 1.011404; token 1: uniform -> ln 3
    h0 = -sum(p * math.log(p) for p in (1 / 6, 1 / 3, 1 / 2))
    assert _close(entropy_from_logits(LOGITS), [[h0, math.log(3)]])
    # A (near) one-hot distribution has (near) zero entropy.
    assert entropy_from_logits(torch.tensor([[[100.0, 0.0, 0.0]]])).item() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_probs_equal_full_logits(temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=g)

    full = token_log_probs(hidden @ weight.T, targets, temperature)
    # 10 tokens in chunks of 3: the last chunk is partial.
    chunked = chunked_token_log_probs(hidden, weight, targets, temperature, chunk_tokens=3)
    assert chunked.shape == (2, 5) and _close(chunked, full)

    grad_full = torch.autograd.grad(full.sum(), (hidden, weight))
    grad_chunked = torch.autograd.grad(chunked.sum(), (hidden, weight))
    for a, b in zip(grad_full, grad_chunked, strict=True):
        assert _close(a, b)

    with torch.no_grad():
        assert _close(chunked_token_log_probs(hidden, weight, targets, temperature, chunk_tokens=4), full)


# ---- masked mean and the policy loss ----------------------------------------------------------


def test_masked_mean_is_token_level():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    # (1 + 3 + 6) / 3 tokens, not the mean of per-sequence means (2 + 6) / 2
    assert _close(masked_mean(x, mask), 10 / 3)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # max(sum(mask), 1) guards 0/0


# Six tokens, the last masked out. ratio = exp(log_probs - old_log_probs).
RATIO = [1.5, 0.5, 0.5, 1.5, 1.0, 3.0]
ADV = [1.0, 1.0, -1.0, -1.0, 2.0, 1.0]
MASK = [1, 1, 1, 1, 1, 0]
OLD = [-1.0, -1.0, -2.0, -0.5, -0.3, -1.0]


def _inputs():
    old = torch.tensor([OLD], requires_grad=True)  # requires_grad to prove no gradient reaches it
    log_probs = (torch.tensor([OLD]) + torch.log(torch.tensor([RATIO]))).requires_grad_()
    adv = torch.tensor([ADV], requires_grad=True)
    return log_probs, old, adv, torch.tensor([MASK])


def test_policy_loss_clip_higher_by_hand():
    log_probs, old, adv, mask = _inputs()
    loss, metrics = policy_loss(log_probs, old, adv, mask, eps_clip=0.2, eps_clip_high=0.28)
    # per token, pg1 = -r A, pg2 = -clip(r, 0.8, 1.28) A, loss = max(pg1, pg2):
    #   1: r 1.5, A +1: max(-1.5, -1.28) = -1.28  clipped
    #   2: r 0.5, A +1: max(-0.5, -0.8)  = -0.5
    #   3: r 0.5, A -1: max( 0.5,  0.8)  =  0.8   clipped
    #   4: r 1.5, A -1: max( 1.5,  1.28) =  1.5
    #   5: r 1.0, A +2: -2
    #   6: masked out
    # loss = (-1.28 - 0.5 + 0.8 + 1.5 - 2) / 5 = -0.296; clipfrac 2/5
    assert _close(loss, -0.296)
    assert _close(metrics["pg_clipfrac"], 0.4)
    # ppo_kl = mean(old - new) = -(ln 1.5 + ln 0.5 + ln 0.5 + ln 1.5 + 0) / 5 = -2 ln 0.75 / 5
    assert _close(metrics["ppo_kl"], -2 * math.log(0.75) / 5)
    assert set(metrics) == {"pg_clipfrac", "ppo_kl"}

    loss.backward()
    # d/d log_probs of -r A is -r A where not clipped, 0 where clipped, each / 5 tokens:
    #   [0, -0.5/5, 0, 1.5/5, -2/5, 0 (masked)]
    assert _close(log_probs.grad, [[0.0, -0.1, 0.0, 0.3, -0.4, 0.0]])
    assert old.grad is None and adv.grad is None  # gradients flow only through log_probs


def test_policy_loss_symmetric_when_eps_clip_high_is_none():
    log_probs, old, adv, mask = _inputs()
    loss, _ = policy_loss(log_probs, old, adv, mask, eps_clip=0.2, eps_clip_high=None)
    # token 1 now clips at 1.2: (-1.2 - 0.5 + 0.8 + 1.5 - 2) / 5 = -0.28
    assert _close(loss, -0.28)


def test_policy_loss_with_tis_by_hand():
    log_probs, old, adv, mask = _inputs()
    # rollout log-probs chosen so that tis = exp(old - rollout) = [0.5, 1, 3, 1.5, 1.2, 10]
    raw_tis = torch.tensor([[0.5, 1.0, 3.0, 1.5, 1.2, 10.0]])
    rollout = (torch.tensor([OLD]) - torch.log(raw_tis)).requires_grad_()
    loss, metrics = policy_loss(
        log_probs,
        old,
        adv,
        mask,
        eps_clip=0.2,
        eps_clip_high=0.28,
        rollout_log_probs=rollout,
        use_tis=True,
        tis_clip=2.0,
        tis_clip_low=0.6,
    )
    # weights = clamp(tis, 0.6, 2.0) = [0.6, 1, 2, 1.5, 1.2, (2, masked)]
    # pg * w = [-1.28*0.6, -0.5*1, 0.8*2, 1.5*1.5, -2*1.2] = [-0.768, -0.5, 1.6, 2.25, -2.4]
    # loss = 0.182 / 5 = 0.0364
    assert _close(loss, 0.0364)
    assert _close(metrics["tis_mean"], (0.5 + 1 + 3 + 1.5 + 1.2) / 5)  # 1.44
    assert _close(metrics["tis_max"], 3.0)  # the masked 10 does not count
    assert _close(metrics["tis_clipfrac"], 0.4)  # 0.5 and 3.0 were clipped
    assert _close(metrics["pg_clipfrac"], 0.4)

    loss.backward()
    # unclipped tokens: -r A w / 5 -> [0, -0.5*1/5, 0, 1.5*1.5/5, -2*1.2/5, 0]
    assert _close(log_probs.grad, [[0.0, -0.1, 0.0, 0.45, -0.48, 0.0]])
    assert old.grad is None and adv.grad is None and rollout.grad is None
    assert all(not v.requires_grad for v in metrics.values())


def test_policy_loss_tis_needs_rollout_log_probs():
    log_probs, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match="rollout_log_probs"):
        policy_loss(log_probs, old, adv, mask, eps_clip=0.2, eps_clip_high=0.2, use_tis=True)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        policy_loss(log_probs, old, adv, mask, eps_clip=0.2, eps_clip_high=0.2, use_mis=True)


# ---- GSPO: one ratio per sequence ---------------------------------------------------------------


def test_gspo_sequence_ratio_by_hand():
    old = torch.zeros(2, 2)
    # row 0: log-ratios [ln 2, 0] -> mean ln 2 / 2 -> ratio sqrt 2 = 1.4142, A = +1
    # row 1: log-ratios [ln 0.5, ln 2] -> mean 0 -> ratio 1, A = -1
    log_probs = torch.tensor([[math.log(2), 0.0], [math.log(0.5), math.log(2)]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.ones(2, 2)
    loss, metrics = policy_loss(
        log_probs, old, adv, mask, eps_clip=0.2, eps_clip_high=0.2, sequence_ratio=True
    )
    # row 0: max(-1.4142, -1.2) = -1.2 (clipped) on both tokens; row 1: max(1, 1) = 1 on both
    # token mean: (-1.2 * 2 + 1 * 2) / 4 = -0.1
    assert _close(loss, -0.1)
    assert _close(metrics["pg_clipfrac"], 0.5)
    assert _close(metrics["ppo_kl"], -math.log(2) / 4)  # row 0: -ln2/2 twice, row 1: 0 twice, / 4
    loss.backward()
    # row 0 clipped: no gradient. row 1: its two tokens contribute 2 * (-r A) / 4 = r / 2, and the
    # sequence ratio depends on every token: dr/d lp_t = r / 2 = 0.5 -> gradient 0.25 on each
    assert _close(log_probs.grad, [[0.0, 0.0], [0.25, 0.25]])


# ---- behaviour corrections: TIS levels and MIS ---------------------------------------------------

# log(proximal / behaviour) per token; row 0's last token is masked out.
RHO = [[2.0, 1.5, 10.0], [0.5, 0.5, 1.0]]
RHO_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def _rho_inputs():
    old = torch.zeros(2, 3)
    return old, old - torch.log(torch.tensor(RHO))  # rollout = old - log rho


def test_tis_sequence_and_geometric_levels_by_hand():
    old, rollout = _rho_inputs()
    seq = behaviour_correction(
        old, rollout, RHO_MASK, use_tis=True, tis_clip=2.0, tis_clip_low=0.5, tis_level="sequence"
    )
    # row 0: 2 * 1.5 = 3 (the masked 10 is not in the product) -> truncated to 2
    # row 1: 0.5 * 0.5 * 1 = 0.25 -> raised to 0.5
    assert _close(seq.weights, [[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]])
    assert _close(seq.metrics["tis_mean"], (3 * 2 + 0.25 * 3) / 5)  # per trained token: 1.35
    assert _close(seq.metrics["tis_max"], 3.0)
    assert _close(seq.metrics["tis_clipfrac"], 1.0)
    assert torch.equal(seq.keep, torch.ones(2, 3))

    geo = behaviour_correction(old, rollout, RHO_MASK, use_tis=True, tis_clip=2.0, tis_level="geometric")
    # row 0: sqrt(2 * 1.5) = 1.7321; row 1: 0.25 ** (1/3) = 0.62996
    assert _close(geo.weights[:, 0], [math.sqrt(3), 0.25 ** (1 / 3)])

    tok = behaviour_correction(old, rollout, RHO_MASK, use_tis=True, tis_clip=1.8, tis_clip_low=0.0)
    assert _close(tok.weights, [[1.8, 1.5, 1.8], [0.5, 0.5, 1.0]])


def test_mis_token_and_sequence_by_hand():
    old, rollout = _rho_inputs()
    tok = behaviour_correction(old, rollout, RHO_MASK, use_mis=True, mis_low=0.6, mis_high=1.8)
    # token ratios outside [0.6, 1.8]: 2 (row 0), 0.5 and 0.5 (row 1) -> 3 of 5 trained tokens
    assert torch.equal(tok.keep[:, :2], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert tok.keep[1, 2] == 1.0
    assert _close(tok.metrics["mis_masked_frac"], 3 / 5)
    assert torch.equal(tok.weights, torch.ones(2, 3))  # MIS alone weights nothing

    seq = behaviour_correction(
        old, rollout, RHO_MASK, use_mis=True, mis_low=0.2, mis_high=2.5, mis_level="sequence"
    )
    # row 0: 3 > 2.5 -> the whole sequence goes; row 1: 0.25 is inside -> kept
    assert torch.equal(seq.keep, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert _close(seq.metrics["mis_masked_frac"], 2 / 5)


def test_policy_loss_mis_zeroes_rejected_tokens_but_keeps_denominator():
    log_probs, old, adv, mask = _inputs()
    # rollout chosen so that rho = [0.5, 1, 3, 1.5, 1.2, 10]; band [0.8, 2] rejects tokens 1 and 3
    rollout = torch.tensor([OLD]) - torch.log(torch.tensor([[0.5, 1.0, 3.0, 1.5, 1.2, 10.0]]))
    loss, metrics = policy_loss(
        log_probs, old, adv, mask, eps_clip=0.2, eps_clip_high=0.28,
        rollout_log_probs=rollout, use_mis=True, mis_low=0.8, mis_high=2.0,
    )  # fmt: skip
    # per-token losses (see the clip-higher test): [-1.28, -0.5, 0.8, 1.5, -2]; tokens 1 and 3 zeroed
    # -> (-0.5 + 1.5 - 2) / 5 (slime's mis.py: the denominator stays the trained tokens) = -0.2
    assert _close(loss, -0.2)
    assert _close(metrics["mis_masked_frac"], 2 / 5)


# ---- KL estimators -------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # log pi - log pi_ref = [ln 2, -ln 2]
    lp = torch.tensor([math.log(0.5), math.log(0.25)], requires_grad=True)
    ref = torch.tensor([math.log(0.25), math.log(0.5)])
    ln2 = math.log(2)
    assert _close(approx_kl(lp, ref, "k1"), [ln2, -ln2])
    assert _close(approx_kl(lp, ref, "k2"), [ln2**2 / 2, ln2**2 / 2])
    # k3 = exp(-r) - 1 + r: r = ln2 -> 0.5 - 1 + 0.6931 = 0.1931; r = -ln2 -> 2 - 1 - 0.6931 = 0.3069
    assert _close(approx_kl(lp, ref, "k3"), [0.5 - 1 + ln2, 1 - ln2])
    assert _close(approx_kl(lp, ref, "low_var_kl"), [0.5 - 1 + ln2, 1 - ln2])
    # low_var_kl clamps: r = -20 -> e^20 - 21 -> 10
    assert _close(approx_kl(torch.tensor([-20.0]), torch.tensor([0.0]), "low_var_kl"), [10.0])
    # gradient of k3 through log pi only: d/dr = 1 - exp(-r) -> [0.5, -1]
    approx_kl(lp, ref, "k3").sum().backward()
    assert _close(lp.grad, [0.5, -1.0])
    with pytest.raises(ValueError, match="unknown KL type"):
        approx_kl(lp, ref, "k4")


# ---- loss aggregation ----------------------------------------------------------------------------


def test_loss_agg_modes_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 60.0, 70.0, 80.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert _close((x * loss_token_weights(mask, "token-mean")).sum(), 2.5)
    # seq-mean-token-mean: (mean(1, 2, 3) + 4) / 2 = 3
    assert _close((x * loss_token_weights(mask, "seq-mean-token-mean")).sum(), 3.0)
    # seq-mean-token-sum-norm (max_len 4): ((1 + 2 + 3) / 4 + 4 / 4) / 2 = 1.25
    assert _close((x * loss_token_weights(mask, "seq-mean-token-sum-norm", max_len=4)).sum(), 1.25)
    # a sequence with nothing to train is not a sequence of the step
    assert _close(
        loss_token_weights(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), "seq-mean-token-mean"),
        [[0.5, 0.5], [0, 0]],
    )
    with pytest.raises(ValueError, match="max_len"):
        loss_token_weights(mask, "seq-mean-token-sum-norm")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_agg_weights_do_not_depend_on_micro_batching(mode):
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    whole = loss_token_weights(mask, mode, max_len=4)
    tokens, seqs = step_totals([mask[:1], mask[1:]])
    parts = [
        loss_token_weights(m, mode, step_tokens=tokens, step_seqs=seqs, max_len=4)
        for m in (mask[:1], mask[1:])
    ]
    assert _close(torch.cat(parts), whole)


# ---- advantage estimators ------------------------------------------------------------------------


def test_group_scores_per_estimator():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    s = 0.5 / math.sqrt(1 / 3)
    assert _close(group_scores(rewards, "grpo"), [[s, -s, -s, s]])
    assert _close(group_scores(rewards, "gspo"), [[s, -s, -s, s]])
    assert _close(group_scores(rewards, "reinforce_plus_plus_baseline"), [[0.5, -0.5, -0.5, 0.5]])  # no std
    assert _close(group_scores(rewards, "reinforce_plus_plus"), rewards)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_scores(rewards, "ppo")


def test_reinforce_plus_plus_returns_by_hand():
    rewards = torch.tensor([1.0, 2.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [9.0, 0.4, 0.2, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = reinforce_plus_plus_returns(rewards, kl, mask, kl_coef=0.5, gamma=0.9)
    # row 0: token rewards -0.5 * kl = [-0.05, -0.1, -0.15], + 1 on the last trained token -> 0.85
    #        returns: 0.85; -0.1 + 0.9 * 0.85 = 0.665; -0.05 + 0.9 * 0.665 = 0.5485; padding 0
    # row 1: the 9 sits on an untrained position and is ignored: [0, -0.2, -0.1 + 2 = 1.9, 0]
    #        returns: 1.9; -0.2 + 1.71 = 1.51; 0 + 0.9 * 1.51 = 1.359
    # row 2: nothing trained -> no reward, no KL -> zeros
    assert _close(got, [[0.5485, 0.665, 0.85, 0.0], [1.359, 1.51, 1.9, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_reinforce_plus_plus_baseline_and_whitening_by_hand():
    adv = reinforce_plus_plus_baseline_advantages(
        torch.tensor([0.5, -0.5]), torch.tensor([[0.2, 0.4]] * 2), 0.5
    )
    assert _close(adv, [[0.4, 0.3], [-0.6, -0.7]])
    # whitening over every masked entry of every tensor: entries 1, 2, 3 -> mean 2, unbiased var 1
    a, b = masked_whiten(
        [torch.tensor([[1.0, 2.0, 99.0]]), torch.tensor([[3.0]])],
        [torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 1)],
    )
    assert _close(a, [[-1.0, 0.0, 97.0]]) and _close(b, [[1.0]])


# ---- staleness policy ----------------------------------------------------------------------------


def _sample(versions, loss_mask=None, status=Status.COMPLETED):
    n = len(versions)
    return Sample(
        tokens=[1, 2] + [3] * n,
        response_length=n,
        policy_versions=versions,
        loss_mask=loss_mask,
        status=status,
    )


def test_staleness_policy_drop_and_correct():
    samples = [
        _sample([3, 3], loss_mask=[1, 0]),  # staleness 2 (at the bound)
        _sample([1, 4]),  # staleness 4: stale
        _sample([5]),  # fresh
        _sample([0], status=Status.FAILED),  # not trainable: not counted
        Sample(tokens=[1, 2, 3], response_length=1),  # no versions known: kept, not in the histogram
    ]
    out, rep = apply_staleness_policy(samples, 5, max_staleness=2, policy="drop")
    assert rep.hist_json() == {"0": 1, "2": 1, "4": 1}
    assert (rep.num_stale, rep.num_dropped) == (1, 1)
    assert [s.loss_mask for s in out[:3]] == [[1, 0], [0, 0], [1]]
    assert samples[1].loss_mask is None  # inputs untouched

    out, rep = apply_staleness_policy(samples, 5, max_staleness=2, policy="correct", mask_offpolicy=True)
    assert (rep.num_stale, rep.num_dropped) == (1, 0)
    # kept, and only its newest segment (version 4) trains
    assert out[1].loss_mask == [0, 1] and rep.num_offpolicy_masked_tokens == 1
    assert rep.num_response_tokens == 1 + 2 + 1 + 1
    with pytest.raises(ValueError, match="stale sample policy"):
        apply_staleness_policy(samples, 5, max_staleness=2, policy="keep")


# ---- chunked entropy -----------------------------------------------------------------------------


def test_chunked_entropy_equals_full_logits():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    lp, ent = chunked_log_probs_and_entropy(hidden, weight, targets, 0.7, chunk_tokens=3)
    assert _close(lp, token_log_probs(hidden @ weight.T, targets, 0.7))
    assert _close(ent, entropy_from_logits(hidden @ weight.T, 0.7))
    (g_chunked,) = torch.autograd.grad(ent.sum(), hidden)
    (g_full,) = torch.autograd.grad(entropy_from_logits(hidden @ weight.T, 0.7).sum(), hidden)
    assert _close(g_chunked, g_full)
