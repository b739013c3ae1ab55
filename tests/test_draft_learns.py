"""The online draft learns what it is there to learn, and the engine then keeps its proposals.

A draft at position i reads the target's hidden state H_i and the embedding of x_{i+1} and must
predict x_{i+2}. On chains where x_{t+1} = rule(x_t) (a fixed permutation, no noise) that is a
lookup the draft's one layer holds easily, so training it beside the target with the trainer's
own loss (`DraftTrainer.loss`: trunk, embedding and LM head detached) must take its cross-entropy
from ln(vocab) to near zero, and greedy speculation with it must keep most of the k drafted tokens
per verify step (an untrained draft keeps ~none: acceptance length ~1).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from slipstream.models import ModelConfig, init_model
from slipstream.models.draft import init_draft
from slipstream.services.rollout.engine.native import NativeEngine
from slipstream.services.rollout.engine.request import Request
from slipstream.services.trainer.draft import DraftTrainer
from slipstream.services.trainer.step_metrics import StepMeans

VOCAB = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def chains(rule: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.empty((batch, length), dtype=torch.int64)
    x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
    for t in range(1, length):
        x[:, t] = rule[x[:, t - 1]]
    return x


def test_draft_learns_a_next_token_rule_and_its_drafts_are_accepted():
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    target = init_model(cfg, seed=0)
    draft = DraftTrainer(cfg, 1, "", 1.0, torch.device("cpu"))
    rule = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(target.parameters(), lr=1e-2)
    draft_opt = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    first = last = None
    for _ in range(200):
        ids = chains(rule, 16, 24, gen)
        hidden = target.model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(target.lm_head(hidden).flatten(0, 1), ids[:, 1:].flatten())
        mask = torch.ones_like(ids[:, 1:], dtype=torch.float32)
        means = StepMeans()
        batch = SimpleNamespace(targets=ids[:, 1:], loss_mask=mask)
        draft_loss = draft.loss(hidden, batch, target, mask / mask.sum(), means)
        opt.zero_grad()
        draft_opt.zero_grad()
        (loss + draft_loss).backward()
        opt.step()
        draft_opt.step()
        ce = float(means.result()["mtp_loss"])
        first = ce if first is None else first
        last = ce
    assert first > 0.8 * math.log(VOCAB), first  # it starts knowing nothing
    assert last < 0.1, (first, last)  # and ends knowing the rule

    target.eval()
    prompts = chains(rule, 4, 4, torch.Generator().manual_seed(2)).tolist()  # inside the trained positions
    kept = {}
    for name, head in (("untrained", init_draft(cfg, 1)), ("trained", draft.head)):
        engine = NativeEngine(target, [], draft=head, speculative_num_steps=3)
        results = engine.generate([Request(f"r{i}", p, 16, temperature=0.0) for i, p in enumerate(prompts)])
        follows = sum(r.tokens == _follow(rule, p[-1], 16) for p, r in zip(prompts, results, strict=True))
        assert follows >= len(prompts) // 2, name  # the target has learnt the rule too
        kept[name] = engine.speculator.acceptance_length
    assert kept["trained"] > 3.2 and kept["untrained"] < 1.5, kept  # of k + 1 = 4 at most


def _follow(rule: torch.Tensor, token: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        token = int(rule[token])
        out.append(token)
    return out
