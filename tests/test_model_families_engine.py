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
import transformers

from slipstream.models import load_model
from slipstream.services.rollout.engine import NativeEngine, Request

torch.set_num_threads(1)
ATOL = 1e-5
VOCAB = 64
NEW = 16

CHECKPOINTS = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"rope_type": "default"}),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        | {"original_max_position_embeddings": 32},
    ),
}


@pytest.fixture(params=list(CHECKPOINTS), scope="module")
def pair(request, tmp_path_factory):
    """(ours, theirs): the same random weights, transformers' model and ours loaded from its save."""
    config_cls, model_cls, rope = CHECKPOINTS[request.param]
    hf_config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_theta": 10000.0, **rope},
        tie_word_embeddings=False,  # a random tied head mostly repeats the last token: a weak test
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(11)
    theirs = model_cls(hf_config).eval()
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        theirs.model.norm.weight.mul_(8.0)  # logits x8, tied head or not
    path = tmp_path_factory.mktemp(request.param)
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
