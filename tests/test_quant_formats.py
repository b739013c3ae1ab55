"""The two quantized weight formats against plain PyTorch definitions, and int4 on the wire.

The references below are written from the formats' definitions (`quant/fp8.py`, `quant/int4.py`
docstrings) one block or group at a time, so a vectorised implementation that drifted from them
(a different rounding, scale, nibble order or padding) fails bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from slipstream.quant import (
    dequantize_blockwise,
    dequantize_int4,
    fake_quantize_blockwise,
    fake_quantize_int4,
    int4_names,
    quantize_blockwise,
    quantize_int4,
)
from slipstream.weights import WeightError, WeightStager, iter_messages, pack, weights_to_sync


def _ref_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group by group: scale = max|w| / 7 (1 for an all-zero group), q = clamp(round(w / s), -7, 7),
    byte i of a row = (q[2i] + 8) | ((q[2i+1] + 8) << 4)."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.int64)
    scales = torch.empty(rows, cols // 128, dtype=torch.float32)
    for r in range(rows):
        for g in range(cols // 128):
            group = w[r, g * 128 : (g + 1) * 128].float()
            amax = group.abs().max()
            s = amax / 7 if amax > 0 else torch.tensor(1.0)
            scales[r, g] = s
            q[r, g * 128 : (g + 1) * 128] = torch.clamp(torch.round(group / s), -7, 7)
    packed = ((q[:, 0::2] + 8) + (q[:, 1::2] + 8) * 16).to(torch.uint8)
    return packed, scales


def _ref_int4_dequant(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    lo = packed.long() % 16 - 8
    hi = packed.long() // 16 - 8
    q = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1).float()
    return q * scales.repeat_interleave(128, dim=1)


def _ref_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by 128x128 block (partial at the edges): scale_inv = amax / 448 (1 if all zero),
    q = e4m3(clamp(w / scale_inv, -448, 448))."""
    rows, cols = w.shape
    nb_r, nb_c = -(-rows // 128), -(-cols // 128)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(nb_r, nb_c, dtype=torch.float32)
    for i in range(nb_r):
        for j in range(nb_c):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            amax = block.abs().max()
            s = amax / 448 if amax > 0 else torch.tensor(1.0)
            scale_inv[i, j] = s
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (block / s).clamp(-448, 448).to(q.dtype)
    return q, scale_inv


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, 5] = 3.0  # an outlier: its group / block gets a large scale
    w[1, :128] = 0.0  # an all-zero int4 group
    w[2, 128:256] = 1e-30  # tiny values (FP8 subnormals)
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_is_bit_exact_against_the_definition(dtype):
    w = _weights(6, 384).to(dtype)
    packed, scales = quantize_int4(w)
    ref_packed, ref_scales = _ref_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 192) and scales.shape == (6, 3)
    assert torch.equal(packed, ref_packed) and torch.equal(scales, ref_scales)
    back = dequantize_int4(packed, scales)
    assert torch.equal(back, _ref_int4_dequant(ref_packed, ref_scales))
    assert torch.equal(dequantize_int4(packed, scales, torch.bfloat16), back.to(torch.bfloat16))
    assert torch.equal(fake_quantize_int4(w), back.to(dtype))  # QAT's weights are the served ones
    assert torch.equal(back[1, :128], torch.zeros(128))
    # Within half a step of each group's scale: the format's promise.
    err = (back - w.float()).abs().view(6, 3, 128).amax(-1)
    assert bool((err <= scales / 2 * (1 + 1e-6)).all())


def test_int4_stacked_experts_are_matrices_side_by_side():
    w = torch.stack([_weights(4, 256, seed=s) for s in range(3)])  # [E, out, in]
    packed, scales = quantize_int4(w)
    for e in range(3):
        p, s = _ref_int4(w[e])
        assert torch.equal(packed[e], p) and torch.equal(scales[e], s)
    assert torch.equal(dequantize_int4(packed, scales), fake_quantize_int4(w))


def test_int4_refuses_matrices_no_group_fits():
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_int4(torch.zeros(4, 96))
    with pytest.raises(ValueError, match="do not fit"):
        dequantize_int4(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 2))


def test_fp8_is_bit_exact_against_the_definition():
    w = _weights(200, 300)  # partial edge blocks both ways
    q, scale_inv = quantize_blockwise(w)
    ref_q, ref_scale = _ref_fp8(w)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale_inv, ref_scale)
    deq = dequantize_blockwise(q, scale_inv)
    ref_deq = ref_q.float() * ref_scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert torch.equal(deq, ref_deq)
    assert torch.equal(fake_quantize_blockwise(w), deq)
    assert torch.equal(
        fake_quantize_blockwise(w, torch.bfloat16), dequantize_blockwise(q, scale_inv, torch.bfloat16)
    )


def test_int4_targets():
    shapes = {
        "model.embed_tokens.weight": (50, 128),
        "lm_head.weight": (50, 128),
        "model.layers.0.self_attn.q_proj.weight": (128, 128),
        "model.layers.0.self_attn.q_norm.weight": (32,),
        "model.layers.0.mlp.down_proj.weight": (128, 96),  # no group fits: stays
        "model.layers.0.mlp.gate_proj.weight": (96, 128),
    }
    assert int4_names(shapes.items(), "auto") == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
    }
    moe = {
        "model.layers.0.self_attn.q_proj.weight": (128, 128),
        "model.layers.0.mlp.gate.weight": (4, 128),  # the router
        "model.layers.0.mlp.experts.gate_up_proj": (4, 64, 128),
        "model.layers.0.mlp.experts.down_proj": (4, 128, 32),  # in = 32: stays
    }
    assert int4_names(moe.items(), "auto") == {"model.layers.0.mlp.experts.gate_up_proj"}
    assert int4_names(moe.items(), "linear") == {
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.self_attn.q_proj.weight",
    }


# ---- on the wire ----------------------------------------------------------------------------


def _state() -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": _weights(20, 128, seed=1),
        "model.layers.0.self_attn.q_proj.weight": _weights(64, 256, seed=2),
        "model.layers.0.mlp.down_proj.weight": _weights(128, 64, seed=3),  # in 64: travels bf16
        "model.norm.weight": torch.ones(128),
    }


def _stage(manifest, chunks, state, **kw):
    stager = WeightStager({n: tuple(t.shape) for n, t in state.items()}, 0, **kw)
    for msg in iter_messages(manifest, chunks):
        stager.add(msg)
    return stager.finish()[1]


def test_int4_version_travels_packed_and_arrives_as_the_trainer_rounded_it():
    state = _state()
    manifest, chunks = pack(state, 1, "int4", chunk_bytes=4096)
    assert manifest.format == "int4-group128"
    entries = {e.name: e for e in manifest.tensors}
    q = entries["model.layers.0.self_attn.q_proj.weight"]
    assert (q.dtype, list(q.shape), q.nbytes, q.scale_name, q.block_size) == (
        "int4", [64, 256], 64 * 128, "model.layers.0.self_attn.q_proj.weight_scale", 128,
    )  # fmt: skip
    scale = entries[q.scale_name]
    assert (scale.dtype, list(scale.shape)) == ("float32", [64, 2])
    assert entries["model.layers.0.mlp.down_proj.weight"].dtype == "bfloat16"
    assert entries["model.embed_tokens.weight"].dtype == "bfloat16"  # never int4

    name = "model.layers.0.self_attn.q_proj.weight"
    dequantized = _stage(manifest, chunks, state)
    assert torch.equal(dequantized[name], fake_quantize_int4(state[name]))
    assert set(dequantized) == set(state)
    kept = _stage(manifest, chunks, state, keep_int4=True)
    packed, scales = quantize_int4(state[name])
    assert torch.equal(kept[name], packed) and torch.equal(kept[name + "_scale"], scales)


def test_int4_manifest_lies_are_refused():
    state = _state()
    manifest, chunks = pack(state, 1, "int4")
    e = next(e for e in manifest.tensors if e.dtype == "int4")
    bad = type(manifest)()
    bad.CopyFrom(manifest)
    bad.format = "bf16"
    with pytest.raises(WeightError, match="int4 tensor .* in a 'bf16' version"):
        _stage(bad, chunks, state)
    bad.CopyFrom(manifest)
    next(x for x in bad.tensors if x.name == e.scale_name).shape[:] = [64, 1]
    with pytest.raises(WeightError):
        _stage(bad, chunks, state)
    bad.CopyFrom(manifest)
    next(x for x in bad.tensors if x.name == e.name).block_size = 64
    with pytest.raises(WeightError, match="block_size 128"):
        _stage(bad, chunks, state)


# ---- MoE: the stacked experts travel FP8 ----------------------------------------------------------


@pytest.mark.parametrize("fp8_engine", [False, True], ids=["bf16-engine", "rollout-fp8-engine"])
def test_moe_experts_travel_fp8_and_the_engine_serves_each_experts_blocks(tmp_path, fp8_engine):
    """A tiny Qwen3-MoE pushed in FP8 (pack -> WeightStager -> load_weights): the stacked experts
    [E, out, in] are e4m3 with per-expert block scales at half their bf16 bytes, and the engine
    serves each expert as its own matrix quantized and dequantized; a --rollout-fp8 engine (FP8
    layers for the projections) gets them dequantized too, there being no FP8 expert GEMM."""
    from mesh_fixtures import build_tiny_model
    from slipstream.models.hf import load_model
    from slipstream.services.rollout.engine import NativeEngine, Request

    moe_dir = build_tiny_model(
        tmp_path / "moe", hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=96,
    )  # fmt: skip
    source = load_model(str(moe_dir), device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a version other than the checkpoint the engine starts from
        for p in source.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    weights = weights_to_sync(source.state_dict(), source.config.tie_word_embeddings)
    experts = [n for n in weights if ".mlp.experts." in n]
    assert len(experts) == 4  # gate_up_proj [4, 192, 128] (a partial block), down_proj [4, 128, 96]
    manifest, chunks = pack(weights, 1, "fp8", chunk_bytes=1 << 16)
    entries = {e.name: e for e in manifest.tensors}
    for name in experts:
        e, scale = entries[name], entries[entries[name].scale_name]
        n_experts, out_f, in_f = weights[name].shape
        assert (e.dtype, list(e.shape), e.block_size) == ("float8_e4m3fn", [n_experts, out_f, in_f], 128)
        assert (scale.dtype, list(scale.shape)) == ("float32", [n_experts, -(-out_f // 128), -(-in_f // 128)])
    assert entries["model.layers.0.mlp.gate.weight"].dtype == "bfloat16"  # the router
    fp8_bytes = sum(entries[n].nbytes + entries[entries[n].scale_name].nbytes for n in experts)
    bf16_manifest, _ = pack(weights, 1, "bf16")
    bf16_bytes = sum(e.nbytes for e in bf16_manifest.tensors if e.name in experts)
    assert 0.5 < fp8_bytes / bf16_bytes < 0.51, (fp8_bytes, bf16_bytes)

    engine = NativeEngine(
        load_model(str(moe_dir), device="cpu", dtype=torch.float32), eos_token_ids=[], max_batch_size=2,
        fp8=fp8_engine,
    )  # fmt: skip
    staged = _stage(manifest, chunks, weights, dtype=torch.float32, keep_fp8=fp8_engine)
    for name in experts:
        assert staged[name].dtype == torch.float32 and name + "_scale_inv" not in staged, name
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert (q_proj + "_scale_inv" in staged) == fp8_engine  # the projections' blocks as they travel
    engine.load_weights(staged, 1)
    served = dict(engine.model.named_parameters())
    for name in experts:
        per_expert = [dequantize_blockwise(*quantize_blockwise(w)) for w in weights[name]]
        assert torch.equal(served[name], torch.stack(per_expert)), name
    assert set(engine.runner.fp8_layers) == (
        {n for n in weights if n.endswith("_proj.weight")} if fp8_engine else set()
    )
    (result,) = engine.generate([Request("r", [3, 4, 5], 4, temperature=0.0)])
    assert len(result.tokens) == 4 and engine.runner.policy_version == 1
