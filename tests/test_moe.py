"""Qwen3-MoE: the routing side channel (replay, capture), the checkpoint layouts, the aux loss.

Parity of logits with `transformers` on both checkpoint directions is in
tests/test_model_families.py (the `qwen3_moe` rows); the engine's greedy tokens against
`generate` in tests/test_model_families_engine.py. Here: what those do not pin.
"""

import dataclasses

import pytest
import torch
import transformers
from family_fixtures import MOE, VOCAB, save_hf_model, shape
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from slipstream.models import ModelConfig, Routing, expert_load, init_model, load_balancing_loss, load_model
from slipstream.services.rollout.engine import NativeEngine, Request

torch.set_num_threads(1)
ATOL = 1e-5
TOP_K, NUM_EXPERTS, NUM_MOE_LAYERS = MOE["num_experts_per_tok"], MOE["num_experts"], 2


def ids(length: int = 24, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe")
    theirs = save_hf_model("qwen3_moe", path, seed=11, tie_word_embeddings=False)
    return load_model(path), theirs, path


def test_router_and_experts_are_really_exercised(pair):
    ours, _, _ = pair
    assert ours.config.moe_layers == (0, 2)  # layer 1 is in mlp_only_layers
    routing = Routing()
    with torch.no_grad():
        ours(ids(), routing=routing)
    experts = routing.stacked()
    assert experts.shape == (2, 24, NUM_MOE_LAYERS, TOP_K)
    load = expert_load(experts, NUM_EXPERTS)
    assert load.shape == (NUM_MOE_LAYERS, NUM_EXPERTS) and (load.sum(1) == 2 * 24 * TOP_K).all()
    assert (load > 0).sum() >= NUM_EXPERTS  # many experts used, not one everywhere


def test_replaying_captured_routing_changes_nothing_and_other_routing_does(pair):
    ours, _, _ = pair
    x = ids()
    captured = Routing()
    with torch.no_grad():
        logits = ours(x, routing=captured)
        replayed = ours(x, routing=Routing(replay=captured.experts))
        other = ours(x, routing=Routing(replay=[(e + 1) % NUM_EXPERTS for e in captured.experts]))
    torch.testing.assert_close(replayed, logits, atol=0, rtol=0)
    assert (other - logits).abs().max() > 1e-3


def test_replay_still_trains_the_router(pair):
    ours, _, _ = pair
    x = ids()
    fixed = [
        torch.zeros(2, 24, TOP_K, dtype=torch.int64) + torch.arange(TOP_K) for _ in range(NUM_MOE_LAYERS)
    ]
    ours.zero_grad()
    ours(x, routing=Routing(replay=fixed)).logsumexp(-1).mean().backward()
    gate = ours.model.layers[0].mlp.gate.weight.grad
    assert gate is not None and gate.abs().max() > 0
    # replayed experts 0 and 1 only: the others got no gradient
    assert ours.model.layers[0].mlp.experts.gate_up_proj.grad[2:].abs().max() == 0
    ours.zero_grad()


def test_transformers_in_memory_layout_loads_too(pair, tmp_path):
    """transformers 5 holds experts fused (gate_up_proj [E, 2I, H]); a file with those names loads."""
    ours, theirs, path = pair
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "model.safetensors")
    )
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    fused = load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids()), ours(ids()), atol=0, rtol=0)


def test_published_layout_is_what_we_save(pair, tmp_path):
    from slipstream.models import save_model

    ours, _, _ = pair
    save_model(ours, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert f"model.layers.2.mlp.experts.{NUM_EXPERTS - 1}.down_proj.weight" in names
    assert "model.layers.0.mlp.gate.weight" in names and "model.layers.1.mlp.gate_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names)


def test_other_moe_settings_match_transformers(tmp_path):
    """No renormalisation, every other layer sparse, 300 experts (int16 ids), tied head."""
    theirs = save_hf_model(
        "qwen3_moe", tmp_path, seed=2, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[],
        num_experts=300, num_experts_per_tok=3, tie_word_embeddings=True,
    )  # fmt: skip
    ours = load_model(tmp_path)
    assert ours.config.moe_layers == (1,) and not ours.config.norm_topk_prob
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), theirs(ids()).logits, atol=ATOL, rtol=0)
    result = NativeEngine(ours, eos_token_ids=[]).generate([Request("r", [1, 2, 3], 4, temperature=0.0)])[0]
    assert result.routed_experts.dtype == torch.int16 and result.routed_experts.shape == (3 + 4 - 1, 3)


def test_load_balancing_loss_equals_transformers():
    logits = [torch.randn(30, NUM_EXPERTS, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    mask = (torch.arange(30) % 7 != 0).long().view(2, 15)
    want = load_balancing_loss_func(tuple(logits), NUM_EXPERTS, TOP_K)
    torch.testing.assert_close(load_balancing_loss(logits, NUM_EXPERTS, TOP_K), want)
    want_masked = load_balancing_loss_func(tuple(logits), NUM_EXPERTS, TOP_K, attention_mask=mask)
    torch.testing.assert_close(load_balancing_loss(logits, NUM_EXPERTS, TOP_K, mask=mask), want_masked)


def test_moe_config_round_trips_and_reads_transformers_spelling():
    config = ModelConfig(**shape("qwen3_moe"), model_type="qwen3_moe")
    d = config.to_hf_dict()
    assert d["num_experts"] == NUM_EXPERTS and "num_local_experts" not in d
    assert ModelConfig.from_hf_dict(d) == config
    hf = transformers.Qwen3MoeConfig(**d).to_dict()  # transformers 5 writes num_local_experts
    assert ModelConfig.from_hf_dict(hf).num_experts == NUM_EXPERTS
    with pytest.raises(ValueError, match="num_experts=8 does not exist for model_type 'qwen3'"):
        ModelConfig(**shape("qwen3_moe") | {"model_type": "qwen3"})
    dense = init_model(ModelConfig(**shape("qwen3")))
    assert not dense.config.moe_layers and not any("experts" in n for n, _ in dense.named_parameters())


@torch.no_grad()
def test_engine_records_the_experts_of_every_fed_position(pair):
    """Prefill (prompt), decode (response), queued requests and a shared-prompt group: the ids the
    engine recorded equal a full forward's routing over the sequence but its last token."""
    ours, _, _ = pair
    prompts = [[(5 * j + 3 * i + 1) % VOCAB for j in range(n)] for i, n in enumerate([20, 3, 27, 9])]
    reqs = [Request(f"r{i}", p, 8, temperature=0.0) for i, p in enumerate(prompts)]
    reqs.append(Request("twin", prompts[0], 8, temperature=0.0))  # follows r0's prefill
    results = NativeEngine(ours, eos_token_ids=[], max_batch_size=3).generate(reqs)
    for req, res in zip(reqs, results, strict=True):
        seq = req.tokens + res.tokens
        routing = Routing()
        ours(torch.tensor([seq[:-1]]), routing=routing)
        want = routing.stacked()[0].reshape(len(seq) - 1, NUM_MOE_LAYERS * TOP_K)
        assert res.routed_experts.dtype == torch.uint8
        assert torch.equal(res.routed_experts.long(), want)


def test_routed_scaling_factor_scales_the_gates_and_round_trips(tmp_path):
    """DeepSeek-V3's key on our Qwen3-MoE: the layer's output times the factor (gate weights times
    it, after renormalisation); config.json carries it only when it is not 1 (Qwen3-MoE has none)."""
    base = ModelConfig(**shape("qwen3_moe"), model_type="qwen3_moe")
    assert "routed_scaling_factor" not in base.to_hf_dict()
    scaled = dataclasses.replace(base, routed_scaling_factor=2.5)
    d = scaled.to_hf_dict()
    assert d["routed_scaling_factor"] == 2.5 and ModelConfig.from_hf_dict(d) == scaled
    one, two = init_model(base, seed=1), init_model(scaled, seed=1)
    with torch.no_grad():
        h = torch.randn(7, base.hidden_size, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(two.model.layers[0].mlp(h), 2.5 * one.model.layers[0].mlp(h))
    with pytest.raises(ValueError, match="routed_scaling_factor must be > 0"):
        dataclasses.replace(base, routed_scaling_factor=0.0)
    with pytest.raises(ValueError, match="this model has no experts"):
        ModelConfig(**shape("qwen3"), model_type="qwen3", routed_scaling_factor=2.0)
