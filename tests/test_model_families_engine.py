"""The native engine generates with every family: greedy tokens equal `transformers`' `generate`.

One checkpoint per family, saved by `transformers` from its own config class (with a scaled RoPE
for Qwen2 and Llama, as Qwen2.5 and Llama 3.1 ship), is loaded by our loader and driven through
the engine's public API on the CPU: prefill, cached decode, a batch with requests that queue. The
tokens must equal `transformers`' greedy `generate` on the same weights, and each token's log-prob
its full-forward log-softmax (atol 1e-5, as tests/test_engine.py). The final norm is scaled up so
the greedy choices have clear winners; prompts plus responses run past the original context (32).
"""

import pytest
import torch
from family_fixtures import VOCAB, save_hf_model

from slipstream.models import load_model
from slipstream.services.rollout.engine import NativeEngine, Request

torch.set_num_threads(1)
ATOL = 1e-5
NEW = 16
ROPE = {"qwen3": "default", "qwen2": "yarn", "llama": "llama3", "qwen3_moe": "default"}  # as they ship


@pytest.fixture(params=list(ROPE), scope="module")
def pair(request, tmp_path_factory):
    """(ours, theirs): the same random weights, transformers' model and ours loaded from its save."""
    path = tmp_path_factory.mktemp(request.param)
    # A random tied head mostly repeats the last token (a weak test): untied here.
    theirs = save_hf_model(request.param, path, ROPE[request.param], seed=11, tie_word_embeddings=False)
    with torch.no_grad():
        theirs.model.norm.weight.mul_(8.0)  # logits x8: greedy choices with clear winners
    theirs.save_pretrained(path)
    return load_model(path), theirs


def prompt(n: int, offset: int) -> list[int]:
    return [(5 * i + 3 * offset + 1) % VOCAB for i in range(n)]


@torch.no_grad()
def test_engine_greedy_equals_transformers_generate(pair):
    ours, theirs = pair
    reqs = [Request(f"r{i}", prompt(n, i), NEW, temperature=0.0) for i, n in enumerate([20, 3, 27, 9])]
    results = NativeEngine(ours, eos_token_ids=[], max_batch_size=3).generate(reqs)
    for req, res in zip(reqs, results, strict=True):
        ids = torch.tensor([req.tokens])
        expected = theirs.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[
            0, len(req.tokens) :
        ]
        assert res.tokens == expected.tolist()
        logits = theirs(torch.tensor([req.tokens + res.tokens])).logits[0, len(req.tokens) - 1 : -1]
        want = logits.log_softmax(-1).gather(-1, torch.tensor(res.tokens)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(res.log_probs), want, atol=ATOL, rtol=0)
