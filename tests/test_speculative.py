"""Exact speculative sampling in the native engine (services/rollout/engine/speculative.py).

The claims, each pinned on a tiny model with a small vocabulary:
- sampled sequences have the target's distribution: a chi-square goodness-of-fit of the
  engine's samples, with and without speculation, against the exact joint probabilities computed
  from the model (false-failure rate 1e-4 per test; the power check says a draft-biased sampler
  would fail it by a wide margin);
- greedy speculation gives the plain engine's tokens, and every recorded log-prob is the target's;
- a draft older than the target is never used; a partial draft update is refused;
- an abort between speculative steps returns accepted tokens only; continuous batching, GRPO groups
  (followers sharing a leader's prefill) and in-place weight swaps keep working.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from slipstream.models import ModelConfig, init_model
from slipstream.models.draft import init_draft
from slipstream.services.rollout.engine.native import NativeEngine
from slipstream.services.rollout.engine.request import Request
from slipstream.services.rollout.engine.sampler import tempered_log_probs, truncated

FALSE_FAILURE_RATE = 1e-4
VOCAB = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(vocab: int = VOCAB) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )  # fmt: skip


def peaked_model(cfg: ModelConfig, seed: int = 0):
    """A random model whose next-token distributions are far from uniform (a random-init draft is
    then a poor proposal, so rejections and residual draws happen often)."""
    model = init_model(cfg, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)
    return model


def engines(cfg: ModelConfig, steps: int = 2, **kw) -> tuple[NativeEngine, NativeEngine]:
    spec = NativeEngine(
        peaked_model(cfg), [], draft=init_draft(cfg, 1, seed=7), speculative_num_steps=steps, **kw
    )
    plain = NativeEngine(peaked_model(cfg), [], **kw)
    return spec, plain


def exact_joint(
    model, prompt: list[int], length: int, temperature: float, top_p: float, top_k: int
) -> torch.Tensor:
    """P(the next `length` tokens = each sequence), [VOCAB ** length], from full forwards."""
    vocab = model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logits = model(ids)[:, len(prompt) - 1 : -1].reshape(-1, vocab)
    n = logits.shape[0]
    lp = tempered_log_probs(logits, torch.full((n,), temperature))
    lp = torch.log_softmax(
        truncated(lp, torch.full((n,), top_p), torch.full((n,), top_k, dtype=torch.int64)), -1
    )
    return lp.view(len(seqs), length, vocab).gather(-1, seqs[..., None])[..., 0].double().sum(1).exp()


def chi_square_p_value(
    counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0
) -> tuple[float, float]:
    """(p-value, statistic) of counts against probs; cells expected below `min_expected` pooled."""
    n = counts.sum()
    expected = probs * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0))), stat


def sample_counts(engine: NativeEngine, prompt: list[int], length: int, num: int, **sampling) -> torch.Tensor:
    reqs = [Request(f"s{i}", list(prompt), length, seed=1000 + i, **sampling) for i in range(num)]
    counts = torch.zeros(VOCAB**length, dtype=torch.float64)
    for r in engine.generate(reqs):
        assert len(r.tokens) == length, r
        counts[sum(t * VOCAB ** (length - 1 - j) for j, t in enumerate(r.tokens))] += 1
    return counts


@pytest.mark.parametrize("at_limit", [False, True], ids=["anywhere", "at-the-limit"])
@pytest.mark.parametrize(
    "sampling", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9, top_k=4)], ids=["plain", "truncated"]
)
def test_token_frequencies_match_the_target_with_and_without_speculation(sampling, at_limit):
    """`at_limit`: the sequences end at max_seq_len and k = 3 > the 2 tokens left after prefill, so
    every verify runs positions past the cache (clamped, never kept)."""
    cfg = tiny_config()
    prompt, length, num = [1, 4, 2], 3, 6000
    kw = dict(max_seq_len=len(prompt) + length) if at_limit else {}
    spec, plain = engines(cfg, steps=3 if at_limit else 2, max_batch_size=256, **kw)
    probs = exact_joint(
        spec.model,
        prompt,
        length,
        sampling.get("temperature"),
        sampling.get("top_p", 1.0),
        sampling.get("top_k", -1),
    )
    for engine in (spec, plain):
        counts = sample_counts(engine, prompt, length, num, **sampling)
        p_value, stat = chi_square_p_value(counts, probs)
        assert p_value > FALSE_FAILURE_RATE, (engine.speculator is not None, stat, p_value)
    # The drafts were really rejected and corrected (a no-op speculator would test nothing) ...
    assert 1.0 < spec.speculator.acceptance_length < 3.0, spec.speculator.acceptance_length
    # ... and the test has power: sampling the tokens uniformly (what a random draft proposes,
    # kept unchecked) would sit far past the failure threshold.
    uniform = torch.full_like(probs, 1.0 / len(probs))
    noncentrality = float(num * ((uniform - probs) ** 2 / probs.clamp(min=1e-12)).sum())
    assert noncentrality > 100 * len(probs)


def _requests(num: int = 10, **kw) -> list[Request]:
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3], [0], [3, 3, 3, 3, 1]]  # repeats: GRPO followers
    return [
        Request(
            f"r{i}",
            prompts[i % len(prompts)],
            5 + (i * 3) % 11,
            stop_token_ids=[5] if i % 3 == 0 else [],
            **kw,
        )
        for i in range(num)
    ]


def test_greedy_speculation_is_the_plain_greedy_decode():
    cfg = tiny_config(vocab=11)
    spec, plain = engines(cfg, steps=3, max_batch_size=4)  # 10 requests through 4 slots
    got, want = spec.generate(_requests(temperature=0.0)), plain.generate(_requests(temperature=0.0))
    for a, b in zip(got, want, strict=True):
        assert (a.tokens, a.finish_reason, a.versions) == (b.tokens, b.finish_reason, b.versions)
        assert a.log_probs == pytest.approx(b.log_probs, abs=1e-5)
    assert spec.speculator.num_verify_steps > 0


def test_recorded_log_probs_are_the_targets():
    cfg = tiny_config(vocab=11)
    spec, _ = engines(cfg, steps=3, max_batch_size=8)
    reqs = _requests(temperature=0.8, top_p=0.9)
    results = spec.generate(reqs)
    for req, res in zip(reqs, results, strict=True):
        ids = torch.tensor([req.tokens + res.tokens])
        with torch.no_grad():
            logits = spec.model(ids)[0, len(req.tokens) - 1 : -1]
        lp = tempered_log_probs(logits, torch.full((len(res.tokens),), 0.8))
        want = lp.gather(-1, torch.tensor(res.tokens)[:, None])[:, 0]
        assert res.log_probs == pytest.approx(want.tolist(), abs=1e-4)
    assert spec.speculator.num_verify_steps > 0


def _draft_state(engine: NativeEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.speculator.draft.state_dict().items()}


def test_a_draft_older_than_the_target_is_never_used():
    cfg = tiny_config(vocab=11)
    spec, _ = engines(cfg, steps=3, max_batch_size=8)
    target = {k: v.clone() for k, v in spec.model.state_dict().items()}
    spec.load_weights(target, 1)  # the target moves on without a draft
    assert not spec.speculator.active(1)
    spec.generate(_requests(temperature=1.0))
    assert spec.speculator.num_verify_steps == 0  # decoded plainly

    with pytest.raises(ValueError, match="all .* draft tensors"):  # half a draft changes nothing
        spec.load_weights({**target, **dict(list(_draft_state(spec).items())[:2])}, 2)
    assert spec.policy_version == 1 and spec.speculator.draft_version == 0

    spec.load_weights({**target, **_draft_state(spec)}, 2)  # a version that carries its draft
    assert spec.speculator.active(2)
    results = spec.generate(_requests(temperature=1.0))
    assert spec.speculator.num_verify_steps > 0
    assert all(set(r.versions) == {2} for r in results)


def test_abort_between_speculative_steps_keeps_accepted_tokens_only():
    cfg = tiny_config(vocab=11)
    spec, plain = engines(cfg, steps=3, max_batch_size=4)
    req = lambda: Request("a", [1, 2, 3], 40, temperature=0.0)  # noqa: E731
    full = plain.generate([req()])[0]
    spec.add_request(req())
    for _ in range(3):
        assert spec.step() == []
    partial = spec.abort("a")
    assert partial.finish_reason == "abort" and 1 < len(partial.tokens) < len(full.tokens)
    assert partial.tokens == full.tokens[: len(partial.tokens)]
    assert partial.log_probs == pytest.approx(full.log_probs[: len(partial.tokens)], abs=1e-5)


def test_weight_swap_mid_generation_versions_each_token():
    cfg = tiny_config(vocab=11)
    spec, _ = engines(cfg, steps=3, max_batch_size=4)
    for r in _requests(4, temperature=1.0):
        r.max_new_tokens = 30
        spec.add_request(r)
    spec.step()
    spec.step()
    state = {**{k: v.clone() for k, v in spec.model.state_dict().items()}, **_draft_state(spec)}
    spec.load_weights(state, 5)
    done = []
    while spec.has_work():
        done += spec.step()
    for r in done:
        assert r.versions == sorted(r.versions) and r.versions[-1] == 5 and r.versions[0] == 0


def test_sequences_that_reach_the_sequence_limit_speculate_to_its_last_token():
    """Within k of max_seq_len a row still drafts k (the verify's positions past the cache are
    clamped and what they compute is never kept): greedy, the plain engine's tokens to the end."""
    cfg = tiny_config(vocab=11)
    spec, plain = engines(cfg, steps=3, max_batch_size=4, max_seq_len=14)
    reqs = _requests(temperature=0.0)
    got, want = spec.generate(reqs), plain.generate(_requests(temperature=0.0))
    for a, b in zip(got, want, strict=True):
        assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
        assert a.log_probs == pytest.approx(b.log_probs, abs=1e-5)
    # some hit the sequence limit before their own max_new_tokens: the case under test
    assert any(
        len(r.tokens) < q.max_new_tokens and r.finish_reason == "length"
        for r, q in zip(got, reqs, strict=True)
    )
    assert spec.speculator.num_verify_steps > 0


def test_the_graph_step_with_padding_rows_is_the_eager_step():
    """The step a CUDA graph captures (inputs read from the slots' device tables, the batch padded
    up to its bucket with rows in free slots, the kept tokens, lengths and statuses written on the
    device) run eagerly on the CPU: the eager step's tokens, versions, finishes and log-probs,
    through admissions into padded buckets, stops, the sequence limit and truncated sampling."""
    from slipstream.services.rollout.engine.graphs import DecodeGraphs

    cfg = tiny_config(vocab=11)

    def run(graphed: bool) -> list:
        engine = NativeEngine(
            peaked_model(cfg), [], max_batch_size=8, max_seq_len=16, preallocate=True,
            draft=init_draft(cfg, 1, seed=7), speculative_num_steps=3,
        )  # fmt: skip
        if graphed:
            engine.runner.graphs = DecodeGraphs(engine.runner)
            engine.runner.graphs.buckets = [4, 8]  # padding at 1-3 and 5-7 running rows
        reqs = _requests(9, temperature=1.0) + _requests(5, temperature=0.0)
        reqs += _requests(4, temperature=0.8, top_p=0.9)
        for i, r in enumerate(reqs):
            r.rid, r.seed = f"q{i}", i
        results = engine.generate(reqs)
        assert engine.speculator.num_verify_steps > 0
        return [(r.tokens, r.log_probs, r.versions, r.finish_reason) for r in results]

    graphed, eager = run(True), run(False)
    for (tokens, log_probs, *rest), (want_tokens, want_log_probs, *want_rest) in zip(
        graphed, eager, strict=True
    ):
        assert (tokens, rest) == (want_tokens, want_rest)
        assert log_probs == pytest.approx(want_log_probs, abs=1e-5)  # a padded batch's matmuls round apart
    assert any(reason == "length" for *_, reason in eager) and any(reason == "stop" for *_, reason in eager)
