"""The native engine against the simplest possible reference: recompute the full forward for every
token (no cache, one sequence at a time). Greedy tokens must be identical and log-probs equal
within fp32 noise (atol 1e-5; logits are O(1)). The model is a tiny random Qwen3 whose LM head is
scaled up so the next-token distributions are peaked: greedy has clear winners and the sampling
tests have something to tell apart.
"""

from collections import Counter

import pytest
import torch

from slipstream.models import Qwen3Config, init_model
from slipstream.services.rollout.engine import NativeEngine, Request
from slipstream.services.rollout.engine.sampler import SamplingParams, sample

torch.set_num_threads(1)
ATOL = 1e-5
VOCAB = 64


def make_model(seed: int = 0, head_scale: float = 8.0):
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=256,
    )
    model = init_model(config, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def prompt(n: int, offset: int = 0) -> list[int]:
    return [(7 * i + 3 * offset + 1) % VOCAB for i in range(n)]


@torch.no_grad()
def reference_greedy(model, tokens: list[int], max_new: int) -> list[int]:
    ids, out = list(tokens), []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


@torch.no_grad()
def reference_log_probs(model, tokens: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) at each response token, from one full forward (T=0: raw logits)."""
    logits = model(torch.tensor([tokens + response]))[0, len(tokens) - 1 : -1]
    scaled = logits / (temperature if temperature > 0 else 1.0)
    return scaled.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_greedy_batch_matches_full_recompute(model):
    """Different prompt lengths, more requests than slots (so requests queue and join later)."""
    reqs = [
        Request(f"r{i}", prompt(n, i), max_new_tokens=12, temperature=0.0)
        for i, n in enumerate([3, 9, 1, 17, 6])
    ]
    engine = NativeEngine(model, eos_token_ids=[], max_batch_size=3)
    results = engine.generate(reqs)
    assert [r.rid for r in results] == [r.rid for r in reqs]
    for req, res in zip(reqs, results, strict=True):
        assert res.tokens == reference_greedy(model, req.tokens, 12)
        assert res.finish_reason == "length" and res.versions == [0] * 12
        torch.testing.assert_close(
            torch.tensor(res.log_probs),
            reference_log_probs(model, req.tokens, res.tokens, 0.0),
            atol=ATOL,
            rtol=0,
        )
    assert not engine.has_work() and engine.num_running == 0


def test_sampled_log_probs_are_full_vocab_tempered(model):
    """Log-probs are log_softmax(logits/T) before truncation, whatever top-k/top-p cut."""
    engine = NativeEngine(model, eos_token_ids=[], seed=1)
    reqs = [
        Request("plain", prompt(5), 16, temperature=0.7),
        Request("topk", prompt(8, 1), 16, temperature=1.3, top_k=3),
        Request("topp", prompt(2, 2), 16, temperature=1.0, top_p=0.8),
    ]
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        expected = reference_log_probs(model, req.tokens, res.tokens, req.temperature)
        torch.testing.assert_close(torch.tensor(res.log_probs), expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_top_k_draws_only_from_the_top_k(model):
    req = Request("k", prompt(4), 24, temperature=2.0, top_k=2, seed=3)
    res = NativeEngine(model, eos_token_ids=[]).generate([req])[0]
    logits = model(torch.tensor([req.tokens + res.tokens]))[0, len(req.tokens) - 1 : -1]
    top2 = logits.topk(2, dim=-1).indices
    assert (top2 == torch.tensor(res.tokens)[:, None]).any(-1).all()


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = NativeEngine(model, eos_token_ids=[]).generate([Request("g", prompt(6), 10, temperature=0.0)])[0]
    engine = NativeEngine(model, eos_token_ids=[])
    k1, p0 = engine.generate(
        [
            Request("k1", prompt(6), 10, temperature=1.5, top_k=1, seed=4),
            Request("p0", prompt(6), 10, temperature=1.5, top_p=1e-6, seed=5),
        ]
    )
    assert k1.tokens == greedy.tokens and p0.tokens == greedy.tokens


def test_seeds_reproduce_and_differ(model):
    def run(seed, companions=0, engine_seed=0):
        reqs = [Request("x", prompt(5), 20, temperature=1.0, seed=seed)]
        reqs += [Request(f"c{i}", prompt(3 + i, i), 7, temperature=1.0) for i in range(companions)]
        return NativeEngine(model, eos_token_ids=[], seed=engine_seed).generate(reqs)[0].tokens

    assert run(11) == run(11)
    assert run(11) == run(11, companions=3)  # a request's draws do not depend on its batch
    assert run(11) != run(12)
    # Requests without a seed are seeded from the engine's seed.
    assert run(None, engine_seed=5) == run(None, engine_seed=5)
    assert run(None, engine_seed=5) != run(None, engine_seed=6)


def test_sampler_matches_the_distribution():
    """Gumbel-max over hashed noise: empirical frequencies match softmax(logits/T)."""
    n = 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]).repeat(n, 1)
    params = SamplingParams(
        temperature=torch.full((n,), 0.8),
        top_p=torch.ones(n),
        top_k=torch.zeros(n, dtype=torch.int64),
        seeds=torch.arange(n, dtype=torch.int64) * 7919,
        positions=torch.full((n,), 5, dtype=torch.int64),
    )
    tokens, log_probs = sample(logits, params, truncate=False)
    expected = (logits[0] / 0.8).softmax(-1)
    counts = torch.bincount(tokens, minlength=6).float() / n
    assert (counts - expected).abs().max() < 0.015  # ~4 standard errors at n=20000
    torch.testing.assert_close(log_probs, expected.log()[tokens], atol=1e-6, rtol=0)
    # top-p 0.7 keeps tokens 0 and 1 only (mass before token 1 is < 0.7, before token 2 it is not).
    params.top_p = torch.full((n,), 0.7)
    tokens, _ = sample(logits, params, truncate=True)
    assert set(Counter(tokens.tolist())) == {0, 1}


def test_stops_on_eos_stop_token_and_lengths(model):
    base = reference_greedy(model, prompt(5), 12)
    eos = base[4]
    first = base.index(eos)
    res = NativeEngine(model, eos_token_ids=[eos]).generate([Request("e", prompt(5), 12, temperature=0.0)])[0]
    assert res.finish_reason == "stop" and res.tokens == base[: first + 1]
    stop = base[6]
    res = NativeEngine(model, eos_token_ids=[]).generate(
        [Request("s", prompt(5), 12, temperature=0.0, stop_token_ids=[stop])]
    )[0]
    assert res.finish_reason == "stop" and res.tokens == base[: base.index(stop) + 1]
    res = NativeEngine(model, eos_token_ids=[], max_seq_len=9).generate(
        [Request("m", prompt(5), 12, temperature=0.0)]
    )
    assert res[0].finish_reason == "length" and res[0].tokens == base[:4]  # 5 prompt + 4 new = 9
    res = NativeEngine(model, eos_token_ids=[], max_seq_len=5).generate([Request("m", prompt(5), 12)])
    assert res[0].finish_reason == "length" and res[0].tokens == []
    res = NativeEngine(model, eos_token_ids=[]).generate([Request("z", prompt(5), 0)])
    assert res[0].finish_reason == "length" and res[0].tokens == []


def test_request_joining_mid_way_matches_running_alone(model):
    alone = reference_greedy(model, prompt(7, 3), 10)
    engine = NativeEngine(model, eos_token_ids=[])
    engine.add_request(Request("a", prompt(12), 20, temperature=0.0))
    finished = []
    for _ in range(4):
        finished += engine.step()
    engine.add_request(Request("b", prompt(7, 3), 10, temperature=0.0))
    assert engine.num_waiting == 1 and engine.num_running == 1
    while engine.has_work():
        finished += engine.step()
    by_rid = {r.rid: r for r in finished}
    assert by_rid["b"].tokens == alone
    assert by_rid["a"].tokens == reference_greedy(model, prompt(12), 20)


def test_a_survivor_moved_into_a_retired_slot_decodes_on(model):
    """Slot 0 retires early; the last running slot, longer than it, moves into its place (the KV
    cache copies the mover's cached positions, not the retired one's) and its greedy tokens
    still match a full recompute."""
    reqs = [
        Request("short", prompt(3), 2, temperature=0.0),
        Request("long", prompt(17, 1), 12, temperature=0.0),
        Request("mover", prompt(9, 2), 12, temperature=0.0),
    ]
    engine = NativeEngine(model, eos_token_ids=[], max_batch_size=3)
    results = {r.rid: r for r in engine.generate(reqs)}
    for req in reqs:
        assert results[req.rid].tokens == reference_greedy(model, req.tokens, req.max_new_tokens)


def test_load_weights_mid_generation_versions_later_tokens(model):
    engine = NativeEngine(make_model(), eos_token_ids=[], policy_version=3)
    engine.add_request(Request("v", prompt(4), 10, temperature=0.0))
    for _ in range(4):
        assert engine.step() == []
    new_weights = {k: v.to(torch.bfloat16) for k, v in make_model(seed=1).state_dict().items()}
    engine.load_weights(new_weights, version=4)
    got = engine.model.model.layers[0].mlp.up_proj.weight
    assert got.dtype == torch.float32 and torch.equal(
        got, new_weights["model.layers.0.mlp.up_proj.weight"].float()
    )
    results = []
    while engine.has_work():
        results += engine.step()
    (res,) = results
    assert res.versions == [3] * 4 + [4] * 6 and len(res.tokens) == 10
    assert res.tokens[:4] == reference_greedy(make_model(), prompt(4), 4)
    with pytest.raises(ValueError, match="unknown parameter"):
        engine.load_weights({"model.layers.0.mlp.up_proj.weight": got, "nope": got}, version=5)
    assert engine.policy_version == 4


def test_abort_returns_partial_that_continues_identically(model):
    full = reference_greedy(model, prompt(6), 14)
    engine = NativeEngine(model, eos_token_ids=[])
    engine.add_request(Request("p", prompt(6), 14, temperature=0.0))
    engine.add_request(Request("q", prompt(3), 14, temperature=0.0))
    for _ in range(5):
        engine.step()
    part = engine.abort("p")
    assert part.finish_reason == "abort" and part.tokens == full[:5] and len(part.log_probs) == 5
    assert engine.abort("p") is None and engine.num_running == 1
    # A partial rollout continues as a longer prompt and lands where it would have.
    rest = Request("p2", prompt(6) + part.tokens, 14 - 5, temperature=0.0)
    engine.add_request(rest)
    engine.add_request(Request("w", prompt(2), 4))
    aborted = engine.abort_all()
    assert {r.rid for r in aborted} == {"q", "p2", "w"} and not engine.has_work()
    assert NativeEngine(model, eos_token_ids=[]).generate([rest])[0].tokens == full[5:]


def test_a_request_id_is_held_once_until_its_result_comes_back(model):
    engine = NativeEngine(model, eos_token_ids=[])
    engine.add_request(Request("a", prompt(4), 3, temperature=0.0))
    with pytest.raises(ValueError, match="request a is already in the engine"):
        engine.add_request(Request("a", prompt(5), 3))  # waiting
    engine.step()
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request(Request("a", prompt(5), 3))  # running
    done = []
    while engine.has_work():
        done += engine.step()
    assert [r.rid for r in done] == ["a"]
    engine.add_request(Request("a", prompt(4), 3, temperature=0.0))  # finished: the id is free again
    assert engine.abort("a").finish_reason == "abort" and engine.abort("a") is None
    engine.add_request(Request("a", prompt(4), 3, temperature=0.0))  # aborted: free again
    assert [r.rid for r in engine.abort_all()] == ["a"]
    engine.add_request(Request("a", prompt(4), 3, temperature=0.0))


def test_group_prompts_are_prefilled_once_and_sample_independently(model):
    """The n samples of a group share one prefill; each still draws exactly what it would alone."""
    group = [Request(f"g{i}", prompt(9), 10, temperature=1.0, seed=100 + i) for i in range(4)]
    other = Request("o", prompt(5, 2), 10, temperature=1.0, seed=7)
    engine = NativeEngine(model, eos_token_ids=[])
    shared = engine.generate([group[0], other, *group[1:]])
    assert engine.num_prefill_tokens == 9 + 5  # the group's prompt once, not four times
    by_rid = {r.rid: r for r in shared}
    for req in [*group, other]:
        alone = NativeEngine(model, eos_token_ids=[]).generate([req])[0]
        assert by_rid[req.rid].tokens == alone.tokens
        torch.testing.assert_close(
            torch.tensor(by_rid[req.rid].log_probs), torch.tensor(alone.log_probs), atol=ATOL, rtol=0
        )
    assert len({tuple(by_rid[r.rid].tokens) for r in group}) > 1  # different seeds, different samples


def test_preallocated_cache_gives_the_same_results(model):
    reqs = [Request(f"r{i}", prompt(n, i), 9, temperature=0.0) for i, n in enumerate([4, 11, 2])]
    grown = NativeEngine(model, eos_token_ids=[]).generate(reqs)
    engine = NativeEngine(model, eos_token_ids=[], max_batch_size=2, max_seq_len=32, preallocate=True)
    assert engine.cache.fixed and engine.cache.k.shape[1] == 2 and engine.cache.capacity == 32
    fixed = engine.generate(reqs)
    assert [r.tokens for r in fixed] == [r.tokens for r in grown]


def _block_rounded(model):
    """The model with its projections rounded to the wire's 128x128-block FP8 (what unified FP8
    trains with and FP8 rollout serves), kept in full precision."""
    from slipstream.quant import should_quantize
    from slipstream.quant.fp8 import dequantize_blockwise, quantize_blockwise

    with torch.no_grad():
        for name, p in model.named_parameters():
            if should_quantize(name, p):
                p.copy_(dequantize_blockwise(*quantize_blockwise(p)))
    return model


def test_fp8_engine_tracks_full_precision_and_requantizes_updates():
    """FP8 linears (fallback path on CPU) serve the 128x128-block-rounded weights: same greedy
    tokens as full precision on those weights (a peaked model), log-probs within the activations'
    FP8 noise; a weight update is re-quantized into the FP8 layers."""
    reqs = [Request(f"r{i}", prompt(n, i), 8, temperature=0.0) for i, n in enumerate([6, 3])]
    full = NativeEngine(_block_rounded(make_model()), eos_token_ids=[]).generate(reqs)
    engine = NativeEngine(make_model(), eos_token_ids=[], fp8=True)
    assert len(engine.runner.fp8_layers) == 2 * 7  # q/k/v/o + gate/up/down per layer
    fp8 = engine.generate(reqs)
    for a, b in zip(full, fp8, strict=True):
        assert a.tokens == b.tokens
        assert (torch.tensor(a.log_probs) - torch.tensor(b.log_probs)).abs().max() < 0.1
    other = make_model(seed=1)
    engine.load_weights(other.state_dict(), version=1)
    updated = engine.generate(reqs)
    fresh = NativeEngine(make_model(seed=1), eos_token_ids=[], fp8=True).generate(reqs)
    assert [r.tokens for r in updated] == [r.tokens for r in fresh]
    with pytest.raises(ValueError, match="expected"):
        engine.load_weights({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, version=2)


def shared_prefix_log_prob_diffs(a, b) -> torch.Tensor:
    """|log-prob difference| of two runs' tokens up to each pair's first differing token."""
    diffs = []
    for x, y in zip(a, b, strict=True):
        for s, t, p, q in zip(x.tokens, y.tokens, x.log_probs, y.log_probs, strict=True):
            if s != t:
                break
            diffs.append(abs(p - q))
    return torch.tensor(diffs)


def test_fp8_kv_cache_tracks_the_full_precision_cache():
    """--kv-cache-dtype fp8_e4m3: e4m3 keys/values (scale 1) give the same sampled tokens for the same
    seeds until a near-tie flips, and log-probs within 0.01 on average (0.002 measured)."""
    reqs = [
        Request(f"r{i}", prompt(n, i), 16, temperature=1.0, seed=i)
        for i, n in enumerate([3, 9, 1, 17, 6, 12])
    ]
    full = NativeEngine(make_model(head_scale=1.0), eos_token_ids=[]).generate(reqs)
    engine = NativeEngine(make_model(head_scale=1.0), eos_token_ids=[], kv_cache_dtype="fp8_e4m3")
    assert engine.cache.k.dtype == torch.float8_e4m3fn
    fp8 = engine.generate(reqs)
    diffs = shared_prefix_log_prob_diffs(full, fp8)
    assert len(diffs) >= len(reqs) * 8  # most of each response is shared
    assert diffs.mean() < 0.01 and diffs.max() < 0.05
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        NativeEngine(make_model(), eos_token_ids=[], kv_cache_dtype="fp8_e5m2")
