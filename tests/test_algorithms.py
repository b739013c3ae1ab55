"""Advantages and losses against values worked out by hand on tiny tensors (arithmetic in comments)."""

import math

import pytest
import torch

from slipstream.algorithms import (
    chunked_token_log_probs,
    entropy_from_logits,
    grpo_advantages,
    masked_mean,
    policy_loss,
    token_log_probs,
)

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
