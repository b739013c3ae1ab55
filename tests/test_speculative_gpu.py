"""Speculative decoding on a GPU: the CUDA-graph path (speculative.py's `_replay`) against the plain
engine and the exact distribution, as tests/test_speculative.py pins the CPU path.

    sh scripts/gpu_env.sh run python3 -m pytest tests/test_speculative_gpu.py -q
"""

from __future__ import annotations

import pytest
import torch

from slipstream.models.draft import init_draft
from slipstream.services.rollout.engine.native import NativeEngine
from tests.test_speculative import (
    FALSE_FAILURE_RATE,
    _requests,
    chi_square_p_value,
    exact_joint,
    peaked_model,
    sample_counts,
    tiny_config,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _engines(cfg, steps=3, **kw):
    spec = NativeEngine(
        peaked_model(cfg).cuda(), [], draft=init_draft(cfg, 1, seed=7), speculative_num_steps=steps, **kw
    )
    plain = NativeEngine(peaked_model(cfg).cuda(), [], **kw)
    return spec, plain


def test_graphed_greedy_speculation_is_the_plain_greedy_decode():
    cfg = tiny_config(vocab=11)
    spec, plain = _engines(cfg, max_batch_size=4, max_seq_len=64)
    assert spec.graphs is not None  # the speculative step replays from its own graphs
    got, want = spec.generate(_requests(temperature=0.0)), plain.generate(_requests(temperature=0.0))
    for a, b in zip(got, want, strict=True):
        assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
        assert a.log_probs == pytest.approx(b.log_probs, abs=1e-4)
    assert spec.speculator.num_verify_steps > 0 and spec.speculator.graphs


def test_graphed_speculation_keeps_the_target_distribution():
    cfg = tiny_config()
    spec, _ = _engines(cfg, steps=2, max_batch_size=256, max_seq_len=64)
    model = peaked_model(cfg)  # the same weights (same seed), on the CPU
    probs = exact_joint(model, [1, 4, 2], 3, 1.0, 1.0, -1)
    counts = sample_counts(spec, [1, 4, 2], 3, 6000, temperature=1.0)
    p_value, stat = chi_square_p_value(counts, probs)
    assert p_value > FALSE_FAILURE_RATE, (stat, p_value)
    assert 1.0 < spec.speculator.acceptance_length < 3.0


def test_fused_verify_is_the_models_multi_token_forward():
    from slipstream.models import ModelConfig, init_model
    from slipstream.services.rollout.engine.fused_step import FusedDecoder
    from slipstream.services.rollout.engine.kv_cache import KVCache
    from slipstream.services.rollout.engine.speculative import fused_verify, multi_token_attention

    cfg = ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
    )  # fmt: skip
    model = init_model(cfg).cuda().to(torch.bfloat16).eval()
    caches = [KVCache(2, 2, 64, 8, 128, torch.bfloat16, torch.device("cuda")) for _ in range(2)]
    for c in caches:
        c.preallocate(8, 128)
    n, t = 5, 4
    with torch.no_grad():
        model.model(torch.randint(0, 512, (n, 9), device="cuda"), attention=caches[0].prefill(0))
        caches[1].k.copy_(caches[0].k)
        caches[1].v.copy_(caches[0].v)
        tokens = torch.randint(0, 512, (n, t), device="cuda")
        pos = torch.tensor([9, 6, 8, 9, 7], device="cuda")[:, None] + torch.arange(t, device="cuda")
        want = model.model(tokens, pos, multi_token_attention(caches[0], pos, 128))
        got = fused_verify(FusedDecoder(model), tokens, pos, caches[1])
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(
        caches[1].k[:, :n, :, :13].float(), caches[0].k[:, :n, :, :13].float(), atol=3e-2, rtol=3e-2
    )


def test_graphed_fused_speculation_matches_plain_greedy():
    from slipstream.models import ModelConfig

    cfg = ModelConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
    )  # fmt: skip
    spec, plain = _engines(cfg, max_batch_size=4, max_seq_len=64)
    assert spec.fused is not None  # the verify runs fused_verify inside the graph
    got, want = spec.generate(_requests(temperature=0.0)), plain.generate(_requests(temperature=0.0))
    for a, b in zip(got, want, strict=True):
        assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
    assert spec.speculator.num_verify_steps > 0
