"""INT4 QAT and unified FP8 (`services/trainer/quantized.py`): the trainer computes with the weights
the rollout serves, gradients pass straight through to the masters, checkpoints reload exactly.

The central check is end to end in one process: a trainer step, the push in the wire format, the
rollout stager and engine, then the engine's sampled log-probs against the trainer's forward on
the same tokens. With QAT they agree to fp32 noise; the same masters trained without QAT do not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_trainer import _samples

from mesh_fixtures import build_tiny_model
from slipstream.config import config_from_values
from slipstream.models.hf import load_model
from slipstream.quant import (
    dequantize_int4,
    fake_quantize_blockwise,
    fake_quantize_int4,
    quantize_blockwise,
    round_fp8_weights_,
)
from slipstream.services.rollout.engine import NativeEngine, Request
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.batch import collate
from slipstream.services.trainer.checkpoint import load_trainer_state, resolve_checkpoint, save_checkpoint
from slipstream.services.trainer.quantized import QuantizedWeights
from slipstream.types import Sample, Status
from slipstream.weights import WeightStager, iter_messages, pack, weights_to_sync

torch.set_num_threads(1)
SCORES = [1.0, -1.0, 0.5, -0.5]
MODES = {"int4": dict(int4_qat=True), "fp8": dict(fp8_format="e4m3")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Every projection's input is a multiple of 128, so int4 groups fit all of them.
    return build_tiny_model(
        tmp_path_factory.mktemp("qat") / "model", hidden_size=128, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    )  # fmt: skip


def _actor(model_dir, **kw) -> Actor:
    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=2, n_samples_per_prompt=2, micro_batch_size=2,
        lr=1e-3, device="cpu", rollout_max_response_len=8,
    )  # fmt: skip
    return Actor.from_config(config_from_values({**values, **kw}))


def _trained(model_dir, **kw) -> Actor:
    actor = _actor(model_dir, **kw)
    actor.train_rollout(_samples(), SCORES)  # move the masters off the checkpoint
    return actor


def _quantizer(mode: str):
    return fake_quantize_int4 if mode == "int4" else fake_quantize_blockwise


# ---- straight-through gradients -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_gradient_reaches_the_master(mode, dtype):
    torch.manual_seed(0)
    master = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Linear(128, 8))
    qw = QuantizedWeights(master, dtype, {"0.weight": _quantizer(mode)})
    w = master[0].weight.detach()
    assert torch.equal(qw.compute[0].weight, _quantizer(mode)(w, dtype))  # quantized once, in fp32
    assert not torch.equal(qw.compute[0].weight.float(), w)
    assert torch.equal(qw.compute[1].weight, master[1].weight.to(dtype))  # a non-target: only cast

    x = torch.randn(5, 256)
    qw.compute(x.to(dtype)).square().sum().backward()
    # The reference: d loss / d (the quantized weight), computed on that weight directly.
    wq = qw.compute[0].weight.detach().clone().requires_grad_(True)
    h = torch.nn.functional.linear(x.to(dtype), wq, qw.compute[0].bias.detach())
    torch.nn.functional.linear(
        h, qw.compute[1].weight.detach(), qw.compute[1].bias.detach()
    ).square().sum().backward()
    assert master[0].weight.grad.dtype == torch.float32
    assert torch.equal(master[0].weight.grad, wq.grad.float())
    assert qw.compute[0].weight.grad is None  # the compute gradient is only a staging buffer


@pytest.mark.parametrize("mode", MODES)
def test_trainer_computes_with_the_quantized_masters(model_dir, mode):
    actor = _trained(model_dir, **MODES[mode])
    names = set(actor.masters.quantized_names)
    assert names and all(".mlp." in n or ".self_attn." in n for n in names)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
    for (name, m), c in zip(actor.model.named_parameters(), actor.compute.parameters(), strict=True):
        want = _quantizer(mode)(m.detach(), c.dtype) if name in names else m
        assert torch.equal(c, want), name


# ---- the rollout serves what the trainer computed with --------------------------------------------


def _served(
    actor: Actor, model_dir, fmt: str, device="cpu", dtype=torch.float32, fp8_engine: bool = False
) -> NativeEngine:
    """A rollout engine on the checkpoint, given the actor's weights through the wire as the mesh
    does (pack -> WeightStager -> load_weights), serving int4 W4A16 when they come as int4, and
    FP8 layers holding the wire's blocks with `fp8_engine` (--rollout-fp8)."""
    weights = actor.state_dict_for_sync()
    manifest, chunks = pack(weights, 1, fmt)
    model = load_model(str(model_dir), device=device, dtype=dtype)
    expected = weights_to_sync(model.state_dict(), model.config.tie_word_embeddings)
    int4 = fmt == "int4"
    engine = NativeEngine(
        model, eos_token_ids=[], max_batch_size=8, int4_targets="auto" if int4 else "", fp8=fp8_engine
    )
    shapes = {n: tuple(t.shape) for n, t in expected.items()}
    stager = WeightStager(shapes, 0, device=device, dtype=dtype, keep_int4=int4, keep_fp8=fp8_engine)
    for msg in iter_messages(manifest, chunks):
        stager.add(msg)
    engine.load_weights(*reversed(stager.finish()))
    return engine


def _rollout_vs_trainer(engine: NativeEngine, actors: list[Actor]) -> list[float]:
    """Max |engine log-prob - trainer log-prob| over sampled tokens, for each actor."""
    reqs = [Request(f"r{i}", [7, 8, 9, 10 + i], 8, temperature=1.0, seed=i) for i in range(4)]
    results = engine.generate(reqs)
    samples = [
        Sample(tokens=r.tokens + res.tokens, response_length=len(res.tokens), status=Status.COMPLETED)
        for r, res in zip(reqs, results, strict=True)
    ]
    batch = collate(samples, [0.0] * len(samples))
    rollout = torch.tensor([res.log_probs for res in results])
    gaps = []
    for actor in actors:
        (lp,) = actor.old_log_probs([batch.to(actor.device)])
        lp = lp.float().cpu()
        trainer = torch.stack(
            [lp[i, s.prompt_length - 1 :][: s.response_length] for i, s in enumerate(samples)]
        )
        gaps.append(float((trainer - rollout).abs().max()))
    return gaps


@pytest.mark.parametrize("mode", MODES)
def test_rollout_log_probs_match_the_quantization_aware_trainer(model_dir, mode):
    qat = _trained(model_dir, **MODES[mode])
    _bf16_rest(qat)
    engine = _served(qat, model_dir, mode)
    # The engine's weights are the trainer's compute weights, bit for bit: no second rounding.
    compute = dict(qat.compute.named_parameters())
    for name in qat.masters.quantized_names:
        if mode == "int4":
            layer = engine.runner.int4_layers[name]
            assert torch.equal(dequantize_int4(layer.packed, layer.scales), compute[name]), name
        else:
            assert torch.equal(dict(engine.model.named_parameters())[name], compute[name]), name
    # The same masters without QAT: the full-precision trainer the quantized rollout disagrees with.
    plain = _actor(model_dir)
    plain.model.load_state_dict(qat.model.state_dict())
    (qat_gap, plain_gap) = _rollout_vs_trainer(engine, [qat, plain])
    assert qat_gap < 1e-4, qat_gap  # fp32 noise: KV-cached decode against a full forward
    assert plain_gap > 20 * max(qat_gap, 1e-6), (qat_gap, plain_gap)


def _bf16_rest(actor: Actor) -> None:
    """Round the tensors that travel bf16 (embeddings, norms) to bf16 in the masters: what is left
    between rollout and trainer is then the quantized weights and fp32 noise."""
    with torch.no_grad():
        for name, p in actor.model.named_parameters():
            if name not in actor.masters.quantized_names:
                p.copy_(p.to(torch.bfloat16))


def test_unified_fp8_into_an_fp8_engine_computes_the_same_function(model_dir):
    """--rollout-fp8: the engine's FP8 layers hold the pushed blocks as they are, and round each
    projection's input per token; the unified FP8 trainer (told --rollout-fp8) does the same."""
    qat = _trained(model_dir, fp8_format="e4m3", rollout_fp8=True)
    _bf16_rest(qat)
    engine = _served(qat, model_dir, "fp8", fp8_engine=True)
    masters = dict(qat.model.named_parameters())
    for name in qat.masters.quantized_names:
        layer = engine.runner.fp8_layers[name]
        q, scale_inv = quantize_blockwise(masters[name].detach())
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, scale_inv.repeat_interleave(128, 0)[: layer.out_features])
    weights_only = _actor(model_dir, fp8_format="e4m3")  # rounds weights, not activations
    weights_only.model.load_state_dict(qat.model.state_dict())
    (same, weights_gap) = _rollout_vs_trainer(engine, [qat, weights_only])
    assert same < 1e-4, same
    assert weights_gap > 10 * max(same, 1e-6), (same, weights_gap)


def test_fp8_push_sends_the_blocks_the_trainer_rounded(model_dir):
    """Unified FP8's push quantizes the masters with the same function the trainer's forward used:
    the wire's e4m3 bytes and scales are those blocks, not a rounding of already-rounded weights."""
    actor = _trained(model_dir, fp8_format="e4m3")
    weights = actor.state_dict_for_sync()
    manifest, chunks = pack(weights, 1, "fp8")
    blob = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    entries = {e.name: e for e in manifest.tensors}
    for name in actor.masters.quantized_names:
        e, s = entries[name], entries[entries[name].scale_name]
        q, scale_inv = quantize_blockwise(weights[name])
        assert torch.equal(blob[e.offset : e.offset + e.nbytes], q.reshape(-1).view(torch.uint8)), name
        assert torch.equal(
            blob[s.offset : s.offset + s.nbytes].view(torch.float32).view(scale_inv.shape), scale_inv
        )


# ---- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_reloads_qat_state_exactly(model_dir, tmp_path, mode):
    actor = _trained(model_dir, **MODES[mode])
    save_checkpoint(tmp_path, 1, actor.model, actor.optimizer, {"policy_version": 1})

    fresh = _actor(model_dir, **MODES[mode])
    load_trainer_state(resolve_checkpoint(str(tmp_path)), fresh.model, fresh.optimizer)
    samples = [dataclasses.replace(s) for s in _samples()]
    batch = collate(samples, [0.0] * len(samples))
    # The next forward re-derives the quantized weights from the loaded masters.
    assert torch.equal(fresh.old_log_probs([batch])[0], actor.old_log_probs([batch])[0])
    for (n, a), b in zip(actor.compute.named_parameters(), fresh.compute.parameters(), strict=True):
        assert torch.equal(a, b), n
    torch.manual_seed(0)
    actor.train_rollout(samples, SCORES)
    torch.manual_seed(0)
    fresh.train_rollout(samples, SCORES)
    for (n, a), b in zip(actor.model.named_parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b), n
    for (n, a), b in zip(actor.compute.named_parameters(), fresh.compute.parameters(), strict=True):
        assert torch.equal(a, b), n


# ---- MoE: the routed experts are the int4 weights -------------------------------------------------


def test_moe_int4_qat_rounds_the_experts_and_the_rollout_serves_them(tmp_path):
    moe_dir = build_tiny_model(
        tmp_path / "moe", hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=128,
    )  # fmt: skip
    actor = _trained(moe_dir, int4_qat=True)
    names = actor.masters.quantized_names  # auto: the experts only, stacked [E, out, in]
    assert names and all(".mlp.experts." in n for n in names), names
    assert not any("self_attn" in n or n.endswith("mlp.gate.weight") for n in names)
    engine = _served(actor, moe_dir, "int4")
    assert not engine.runner.int4_layers  # no W4A16 layer for stacked experts: dequantized on load
    served, compute = dict(engine.model.named_parameters()), dict(actor.compute.named_parameters())
    for name in names:
        assert torch.equal(served[name], compute[name]), name
    # Version 0 too: a fresh engine rounds its checkpoint's experts as the fresh trainer does.
    fresh = _actor(moe_dir, int4_qat=True)
    model = load_model(str(moe_dir), device="cpu", dtype=torch.float32)
    NativeEngine(model, eos_token_ids=[], max_batch_size=2, int4_targets="auto")
    fresh_compute = dict(fresh.compute.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, fresh_compute[name]), name


def _moe_dir(path):
    # moe_intermediate_size 96: gate_up_proj [4, 192, 128] has a partial 128-row block per expert.
    return build_tiny_model(
        path, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96,
    )  # fmt: skip


def test_moe_unified_fp8_rounds_the_experts_and_the_rollout_serves_them(tmp_path):
    """Unified FP8 on an MoE: the stacked experts are FP8 blocks on the wire and in the trainer's
    forward (each expert its own blocks), so the engine serves the trainer's compute weights bit for
    bit, experts included; with --rollout-fp8 the engine computes the experts in its dtype from the
    dequantized blocks (no FP8 grouped GEMM) and the trainer rounds no expert input either."""
    moe_dir = _moe_dir(tmp_path / "moe")
    actor = _trained(moe_dir, fp8_format="e4m3")
    names = actor.masters.quantized_names
    experts = [n for n in names if ".mlp.experts." in n]
    assert experts == [
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    ]
    assert any(n.endswith("self_attn.q_proj.weight") for n in names)
    assert not any(n.endswith("mlp.gate.weight") for n in names)  # routers stay full precision
    compute = dict(actor.compute.named_parameters())
    for name in experts:
        master = dict(actor.model.named_parameters())[name].detach()
        per_expert = torch.stack([fake_quantize_blockwise(m) for m in master])
        assert torch.equal(compute[name], per_expert), name
    engine = _served(actor, moe_dir, "fp8")
    served = dict(engine.model.named_parameters())
    for name in names:
        assert torch.equal(served[name], compute[name]), name
    # Version 0 too: the server rounds its checkpoint (`round_fp8_weights_`) as the fresh trainer does.
    fresh = _actor(moe_dir, fp8_format="e4m3")
    model = load_model(str(moe_dir), device="cpu", dtype=torch.float32)
    assert set(experts) <= set(round_fp8_weights_(model))
    fresh_compute = dict(fresh.compute.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, fresh_compute[name]), name

    # --rollout-fp8: FP8 layers hold the projections' blocks, the experts arrive dequantized.
    qat = _trained(moe_dir, fp8_format="e4m3", rollout_fp8=True)
    _bf16_rest(qat)
    fp8_engine = _served(qat, moe_dir, "fp8", fp8_engine=True)
    assert not set(experts) & set(fp8_engine.runner.fp8_layers)
    assert "model.layers.0.self_attn.q_proj.weight" in fp8_engine.runner.fp8_layers
    served, compute = dict(fp8_engine.model.named_parameters()), dict(qat.compute.named_parameters())
    for name in experts:
        assert torch.equal(served[name], compute[name]), name
    weights_only = _actor(moe_dir, fp8_format="e4m3")  # rounds weights, not activations
    weights_only.model.load_state_dict(qat.model.state_dict())
    (same, weights_gap) = _rollout_vs_trainer(fp8_engine, [qat, weights_only])
    assert same < 1e-4, same
    assert weights_gap > 10 * max(same, 1e-6), (same, weights_gap)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(int4_qat=True, weight_sync_dtype="bf16"), "--int4-qat trains against the int4 weights"),
        (dict(fp8_format="e4m3", weight_sync_dtype="int4"), "--fp8-format trains against the FP8 blocks"),
        (dict(int4_qat=True, fp8_format="e4m3"), "pick one"),
        (dict(int4_qat=True, lora_rank=4), "do not apply"),
        (dict(weight_sync_dtype="int4", rollout_fp8=True), "exclude each other"),
    ],
)
def test_contradictory_precision_flags_are_refused(values, message):
    from slipstream.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_values(values)


def test_auto_wire_format_follows_the_quantization_aware_training():
    assert config_from_values(dict(int4_qat=True)).train.effective_weight_sync_dtype("cpu") == "int4"
    assert config_from_values(dict(fp8_format="e4m3")).train.effective_weight_sync_dtype("cpu") == "fp8"
    assert config_from_values({}).train.effective_weight_sync_dtype("cpu") == "bf16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_on_gpu_bf16_the_served_weights_are_the_trainers(model_dir, mode):
    """--bf16 on the GPU: the push quantizes on the device (FP8: every matrix in one Triton launch),
    the stager dequantizes there (FP8: one launch) or keeps int4 packed for the W4A16 GEMM; the
    weights served are the trainer's bf16 compute weights bit for bit."""
    qat = _trained(model_dir, device="cuda", bf16=True, **MODES[mode])
    engine = _served(qat, model_dir, mode, device="cuda", dtype=torch.bfloat16)
    compute, served = dict(qat.compute.named_parameters()), dict(engine.model.named_parameters())
    for name in qat.masters.quantized_names:
        if mode == "int4":
            layer = engine.runner.int4_layers[name]
            assert torch.equal(dequantize_int4(layer.packed, layer.scales, torch.bfloat16), compute[name]), (
                name
            )
        else:
            assert torch.equal(served[name], compute[name]), name
    plain = _actor(model_dir, device="cuda", bf16=True)
    plain.model.load_state_dict(qat.model.state_dict())
    plain.masters.refresh()
    (qat_gap, plain_gap) = _rollout_vs_trainer(engine, [qat, plain])
    assert qat_gap < plain_gap, (qat_gap, plain_gap)  # bf16 noise on both; the rounding only on one
