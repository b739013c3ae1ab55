"""The fused sampler's split over the vocabulary (kernels/sampling.py) against the plain sampler:
the same tokens (hashed noise, ties to the lowest id, greedy rows), the log-prob of the definition,
`log_probs` equal to what `sample` reports, and a row's numbers independent of its batch.

Without a GPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, in a subprocess;
skipped where Triton is not installed, as in the project's CPU venv); on a GPU the same checks run
on CUDA.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_checks import needs_interpreter, run_checks

CHECKS = textwrap.dedent(
    """
    import torch
    from slipstream.kernels import sampling
    from slipstream.services.rollout.engine.sampler import SamplingParams, sample, tempered_log_probs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    # vocabularies: one block, one run of several blocks, a last run of one id, Qwen's 151,936;
    # each at the module's block and at 2048 (bench/engine_gpu.py's other setting)
    cases = [(block, n, vocab) for block in (sampling.BLOCK, 2048) for n, vocab in [(4, 20), (5, 5000), (4, 2049), (3, 18433), (6, 151936)]]
    for block, n, vocab in cases:
        sampling.BLOCK = block
        per, parts = sampling.split(vocab)
        assert per % block == 0 and (parts - 1) * per < vocab <= parts * per, (vocab, per, parts)
        logits = torch.randn(n, vocab, device=device) * 3
        # a tie for the greedy row (in two different runs where the vocabulary has several)
        logits[0, 3] = logits[0, vocab - 1] = 60.0
        if vocab > 3 + block:  # ... and one in the same lane of the same run (a later block)
            logits[0, 3 + block] = 60.0
        temps = torch.tensor([0.0, 0.9, 1.0, 1.3, 0.7, 2.0][:n], device=device)
        seeds = torch.randint(0, 1 << 62, (n,), device=device)
        positions = torch.randint(0, 4096, (n,), device=device)
        tokens, reported = sampling.sample(logits, temps, seeds, positions)
        params = SamplingParams(
            temps, torch.ones(n, device=device), torch.zeros(n, dtype=torch.int64, device=device),
            seeds, positions,
        )
        ref_tokens, _ = sample(logits.cpu(), SamplingParams(*(t.cpu() for t in vars(params).values())))
        assert torch.equal(tokens.cpu(), ref_tokens), (vocab, tokens, ref_tokens)
        assert tokens[0] == 3, tokens  # greedy: the lower of two equal maxima
        exact = tempered_log_probs(logits, temps).gather(-1, tokens[:, None])[:, 0]
        assert torch.allclose(reported, exact, atol=1e-4, rtol=0), (reported - exact).abs().max()
        assert torch.equal(reported, sampling.log_probs(logits, temps, tokens))
        # a row alone gives what it gave in the batch, bit for bit
        for i in (0, n - 1):
            one_tok, one_lp = sampling.sample(logits[i : i + 1], temps[i : i + 1], seeds[i : i + 1], positions[i : i + 1])
            assert torch.equal(one_tok, tokens[i : i + 1]) and torch.equal(one_lp, reported[i : i + 1]), i
            assert torch.equal(sampling.log_probs(logits[i : i + 1], temps[i : i + 1], tokens[i : i + 1]), one_lp)
    print("ok")
    """
)


@needs_interpreter
def test_split_sampler_under_the_interpreter():
    run_checks(CHECKS, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_sampler_on_the_gpu():
    run_checks(CHECKS, interpret=False)
