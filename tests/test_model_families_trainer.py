"""The trainer takes Qwen2 and Llama checkpoints (it refused every model_type but qwen3 before).

A checkpoint `transformers` saved (Qwen2 with yarn RoPE and its q/k/v biases, Llama with llama3
RoPE) goes through the trainer's actor: padded and packed micro-batches give `transformers`' own
log-probs (the samples carry them as rollout log-probs, so the mismatch metric is the check), one
step moves every parameter group including the biases, and the weight push carries them.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from family_fixtures import VOCAB, save_hf_model

from slipstream.config import config_from_values
from slipstream.services.trainer.actor import Actor
from slipstream.types import Sample, Status

torch.set_num_threads(1)
ROPE = {"qwen2": "yarn", "llama": "llama3"}


@pytest.fixture(params=list(ROPE), scope="module")
def checkpoint(request, tmp_path_factory):
    """(path, transformers' model): Qwen2 untied, Llama tied (its tied head must reach the push)."""
    path = tmp_path_factory.mktemp(request.param)
    return path, save_hf_model(
        request.param, path, ROPE[request.param], seed=21, tie_word_embeddings=request.param == "llama"
    )


def samples_with_their_log_probs(theirs) -> list[Sample]:
    """Four samples (3 prompt + 5..8 response tokens) whose rollout log-probs are transformers'."""
    out = []
    for i in range(4):
        tokens = [(7 * j + 5 * i + 1) % VOCAB for j in range(8 + i)]
        with torch.no_grad():
            lp = theirs(torch.tensor([tokens])).logits[0].log_softmax(-1)
        resp = torch.tensor(tokens[3:])
        own = lp[2:-1].gather(-1, resp[:, None]).squeeze(-1)
        out.append(
            Sample(
                tokens=tokens,
                response_length=len(tokens) - 3,
                reward=float(i % 2),
                status=Status.COMPLETED,
                policy_versions=[0] * (len(tokens) - 3),
                rollout_log_probs=own.tolist(),
            )
        )
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_trainer_steps_on_the_family_with_transformers_log_probs(checkpoint, packed):
    path, theirs = checkpoint
    values = dict(
        hf_checkpoint=str(path),
        rollout_batch_size=2,
        n_samples_per_prompt=2,
        micro_batch_size=2,
        lr=1e-2,
        device="cpu",
        rollout_max_response_len=8,
    )
    if packed:
        values |= dict(use_dynamic_batch_size=True, max_tokens_per_gpu=24)
    actor = Actor.from_config(config_from_values(values))
    before = {k: v.clone() for k, v in actor.model.state_dict().items()}
    stats = actor.train_rollout(samples_with_their_log_probs(theirs), [1.0, -1.0, 1.0, -1.0])
    assert stats.logprob_abs_diff_mean < 1e-5 and stats.metrics["logprob_abs_diff_max"] < 1e-5
    after = actor.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == set(before)  # every tensor, biases included, got a gradient and a step
    synced = actor.state_dict_for_sync()
    assert set(synced) >= {k for k in before if k != "lm_head.weight"}
    if isinstance(theirs, transformers.Qwen2ForCausalLM):
        assert "model.layers.0.self_attn.q_proj.bias" in synced
