"""--true-on-policy-mode: the log-probs the engine's sampler reported for the tokens it sampled equal
the trainer's log-probs of the same tokens bit for bit (kernels/invariant.py), while plain kernels
differ; and the invariant kernels themselves are row- and length-invariant.

The samples come from the engine's own decode (prefill, then one token a step while requests of
several prompt lengths and response lengths join and leave the batch), never a prefill recompute.
"""

from __future__ import annotations

import pytest
import torch

from mesh_fixtures import build_tiny_model
from slipstream.config import ConfigError, config_from_values
from slipstream.kernels import invariant
from slipstream.models.hf import load_model
from slipstream.services.rollout.engine.native import NativeEngine
from slipstream.services.rollout.engine.request import Request
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.batch import collate
from slipstream.types import Sample, Status

MOE = dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("top") / "model", max_position_embeddings=96)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("top-moe") / "model", max_position_embeddings=96, **MOE)


def _cfg(model_dir, **kw):
    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=2, n_samples_per_prompt=4, micro_batch_size=4,
        device="cpu", rollout_max_response_len=40, true_on_policy_mode=True,
    )  # fmt: skip
    values.update(kw)
    return config_from_values(values)


def _rollout(model_dir, true_on_policy: bool) -> list[Sample]:
    """Twelve samples from the engine: 3 prompts x 4, responses of up to 40 tokens, max batch 5
    (so rows join mid-flight and the decode batch changes size every few steps)."""
    engine = NativeEngine(
        load_model(model_dir), eos_token_ids=[], max_batch_size=5, true_on_policy=true_on_policy
    )
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    reqs = [
        Request(f"{i}-{j}", p, max_new_tokens=12 + 7 * j, seed=100 * i + j)
        for i, p in enumerate(prompts)
        for j in range(4)
    ]
    return _generate(engine, reqs)


def _generate(engine: NativeEngine, reqs: list[Request]) -> list[Sample]:
    """The engine's results as samples carrying the sampler's own log-probs."""
    return [
        Sample(
            tokens=req.tokens + res.tokens,
            response_length=len(res.tokens),
            reward=0.0,
            status=Status.COMPLETED,
            rollout_log_probs=res.log_probs,
            policy_versions=res.versions,
        )  # fmt: skip
        for req, res in zip(reqs, engine.generate(reqs), strict=True)
    ]


def _mismatch(actor: Actor, samples: list[Sample]) -> tuple[float, int]:
    """(max |trainer - sampler| over the sampled tokens, number of tokens)."""
    batch = collate(samples, [0.0] * len(samples))
    with torch.no_grad():
        trainer = actor.log_probs(batch)
    worst, n = 0.0, 0
    for row, s in enumerate(samples):
        start = len(s.tokens) - s.response_length - 1  # the position that predicts the first response token
        mine = trainer[row, start : start + s.response_length]
        theirs = torch.tensor(s.rollout_log_probs, dtype=torch.float32)
        worst = max(worst, float((mine - theirs).abs().max()))
        n += s.response_length
    return worst, n


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_sampler_log_probs_equal_the_trainers_bit_for_bit(kind, request):
    """Dense and mixture-of-experts (each expert runs on whichever rows routed to it, a number that
    differs between a decode step and the training batch)."""
    model_dir = request.getfixturevalue("model_dir" if kind == "dense" else "moe_dir")
    samples = _rollout(model_dir, true_on_policy=True)
    actor = Actor.from_config(_cfg(model_dir))
    worst, n = _mismatch(actor, samples)
    assert n > 250 and worst == 0.0, (worst, n)


def test_plain_kernels_do_not_match(model_dir):
    """What the mode fixes: the same run on the ordinary kernels differs in the last bits."""
    samples = _rollout(model_dir, true_on_policy=False)
    actor = Actor.from_config(_cfg(model_dir, true_on_policy_mode=False, weight_sync_dtype="bf16"))
    worst, _ = _mismatch(actor, samples)
    assert 0.0 < worst < 1e-4, worst


def test_training_keeps_them_equal_after_the_weights_move(model_dir):
    """After an optimizer step the trainer's compute copy is the bf16 of its fp32 masters, which is
    what the rollout loads from a bf16 push: their log-probs still agree exactly."""
    actor = Actor.from_config(_cfg(model_dir, lr=1e-2))
    samples = _rollout(model_dir, true_on_policy=True)
    actor.train_rollout(samples, [1.0, -1.0] * (len(samples) // 2))
    engine_model = load_model(model_dir)
    with torch.no_grad():
        for name, p in engine_model.named_parameters():  # a bf16 push, as the stager loads it
            p.copy_(dict(actor.model.named_parameters())[name].to(torch.bfloat16).float())
    engine = NativeEngine(engine_model, eos_token_ids=[], max_batch_size=3, true_on_policy=True)
    moved = _generate(engine, [Request(f"r{i}", [3, 4, 5, 6][: i + 1], 20, seed=i) for i in range(4)])
    worst, _ = _mismatch(actor, moved)
    assert worst == 0.0, worst


def test_invariant_linear_and_attention_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    w, x = torch.randn(48, 32), torch.randn(70, 32)
    full = invariant.linear(x, w)
    assert all(torch.equal(invariant.linear(x[i : i + 1], w)[0], full[i]) for i in range(70))
    # 13: the trainer's keys fit one chunk, the cache's four; query heads per KV head 2, 4 and 1
    for t_len, d, h, h_kv in ((40, 8, 4, 2), (13, 32, 4, 2), (37, 16, 8, 2), (21, 32, 3, 3)):
        q, k, v = torch.randn(1, h, t_len, d), torch.randn(1, h_kv, t_len, d), torch.randn(1, h_kv, t_len, d)
        causal = invariant.causal_attention(0, q, k, v)
        # the trainer's padded batch: the sequence as row 1 of 3, padded to 19 more positions
        batch = [torch.randn(3, n, t_len + 19, d) for n in (h, h_kv, h_kv)]
        for whole, part in zip(batch, (q, k, v), strict=True):
            whole[1, :, :t_len] = part[0]
        assert torch.equal(invariant.causal_attention(0, *batch)[1, :, :t_len], causal[0])
        for t in range(t_len):  # one query over a longer cache with garbage past its position
            cache_k = torch.cat([k[:, :, : t + 1], torch.randn(1, h_kv, 64 - t - 1, d)], 2)
            cache_v = torch.cat([v[:, :, : t + 1], torch.randn(1, h_kv, 64 - t - 1, d)], 2)
            mask = (torch.arange(64) <= t)[None, None, None]
            one = invariant.attention(q[:, :, t : t + 1], cache_k, cache_v, mask)
            assert torch.equal(one[:, :, 0], causal[:, :, t]), (t_len, d, t)
        # a decode step of t_len slots, slot i at position i, over kv_len 50 of a cache of 64
        cache_k, cache_v = torch.randn(t_len, h_kv, 64, d), torch.randn(t_len, h_kv, 64, d)
        for i in range(t_len):
            cache_k[i, :, : i + 1], cache_v[i, :, : i + 1] = k[0, :, : i + 1], v[0, :, : i + 1]
        step = invariant.decode_attention(
            q[0].transpose(0, 1)[:, :, None], cache_k, cache_v, torch.arange(1, t_len + 1), 50
        )
        assert torch.equal(step[:, :, 0], causal[0].transpose(0, 1)), (t_len, d, h)


def test_make_invariant_swaps_every_layer_class_also_under_fsdp2s_subclasses():
    """FSDP2 gives each sharded module a class of its own (`FSDP` + the class's name, with
    `FSDPModule` first): a sharded trainer's decoder layers must still take the mode's classes, or
    its arithmetic would differ from the engine's."""
    from slipstream.models import ModelConfig, init_model
    from slipstream.models.decoder import DecoderLayer

    class FSDPModule:  # stands in for torch.distributed.fsdp.FSDPModule
        pass

    model = init_model(ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8), seed=0)  # fmt: skip
    layer = model.model.layers[1]
    layer.__class__ = type("FSDPDecoderLayer", (FSDPModule, DecoderLayer), {})
    invariant.make_invariant(model)
    assert type(model.model.layers[0]) is invariant.InvariantDecoderLayer
    assert isinstance(layer, FSDPModule) and isinstance(layer, invariant.InvariantDecoderLayer)
    assert type(layer).after_attention is invariant.InvariantDecoderLayer.after_attention
    assert isinstance(layer.self_attn, invariant.InvariantSelfAttention)
    assert isinstance(layer.mlp, invariant.InvariantMLP)
    assert isinstance(layer.self_attn.q_proj, invariant.InvariantLinear)
    ids = torch.randint(0, 32, (2, 5))
    assert model(ids).shape == (2, 5, 32)  # on the CPU the classes compute the model's own ops


def test_the_mode_refuses_what_it_does_not_cover(model_dir):
    for bad, says in (
        (dict(rollout_fp8=True), "--rollout-fp8"),
        (dict(weight_sync_dtype="fp8"), "--weight-sync-dtype"),
        (dict(speculative_algorithm="EAGLE", mtp_num_layers=1), "--speculative-algorithm"),
        (dict(bf16=True), "drop --bf16"),  # a bf16 trainer against the CPU's fp32 rollout
        (dict(device="cuda"), "add --bf16"),  # an fp32 trainer against the GPU's bf16 rollout
    ):
        with pytest.raises(ConfigError, match=says.replace("-", "\\-")):
            _cfg(model_dir, **bad)
    _cfg(model_dir, device="cuda", bf16=True)  # one dtype on both sides: bf16
    _cfg(model_dir, device="cuda", dtype="float32")  # ... or fp32


@pytest.mark.slow
def test_the_mesh_trains_with_zero_mismatch(model_dir, tmp_path, redis_url):
    """Separate processes, real gRPC and Redis, bf16 pushes: every step's sampled tokens have exactly
    the trainer's log-probs (on-policy, --sync, so the weights sampled with are the weights trained)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from machine_speed import scaled

    from mesh_fixtures import build_prompts

    run_dir = tmp_path / "run"
    argv = [
        sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"),
        "--hf-checkpoint", str(model_dir), "--prompt-data", str(build_prompts(tmp_path / "train.jsonl")),
        "--run-dir", str(run_dir), "--redis-url", redis_url, "--rollout-batch-size", "2",
        "--n-samples-per-prompt", "4", "--num-rollout", "3", "--rollout-max-response-len", "8",
        "--lr", "1e-2", "--rollout-num-servers", "1", "--sync", "--true-on-policy-mode",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(150))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "now serving weights version 2 (bf16" in (run_dir / "logs" / "rollout-0.log").read_text()
    assert [r["logprob_abs_diff_max"] for r in rows] == [0.0, 0.0, 0.0], rows
