"""FP8 / int4 pushes under FSDP2 quantized shard by shard (issue 20): each rank quantizes the rows
it holds and rank 0 gathers the quantized rows, instead of gathering the fp32 masters and
quantizing them alone (`parallel.wire_state`). Two gloo ranks pack both ways: the same manifest
and the same bytes, for a fraction of what rank 0 receives and no larger tensor on any rank."""

import json
import sys
from pathlib import Path

import pytest

from mesh_fixtures import build_tiny_model

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fsdp_worker  # noqa: E402


def _two_ranks(model_dir: Path, out: Path) -> dict:
    fsdp_worker.run_two_ranks(model_dir, out, "wire")
    return {
        (fmt, rank): json.loads((out / f"wire_{fmt}_{rank}.json").read_text())
        for fmt in fsdp_worker.WIRE_MODES
        for rank in (0, 1)
    }


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    # q/o/gate/up/down have 256 or 512 rows: two ranks hold whole 128-row FP8 blocks of them;
    # k/v have 64 rows (32 a rank), which cut through a block: gathered in fp32 as before.
    model_dir = build_tiny_model(
        tmp_path_factory.mktemp("fsdp_wire") / "model", hidden_size=256, intermediate_size=512,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    )  # fmt: skip
    return _two_ranks(model_dir, tmp_path_factory.mktemp("fsdp_wire_out"))


@pytest.mark.parametrize("fmt", fsdp_worker.WIRE_MODES)
def test_shard_by_shard_packs_the_same_bytes(fmt, reports):
    report = reports[fmt, 0]
    assert report["same_manifest"] and report["same_chunks"], report
    projections = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if fmt == "int4":
        projections += ("k_proj", "v_proj")
    expected = sorted(f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}.weight"
                      for i in (0, 1) for p in projections)  # fmt: skip
    assert report["quantized_on_ranks"] == expected


@pytest.mark.parametrize("fmt", fsdp_worker.WIRE_MODES)
def test_rank_0_receives_the_wire_size_and_no_rank_a_larger_tensor(fmt, reports):
    main = reports[fmt, 0]
    gathered, sharded = main["gathered"]["received"], main["sharded"]["received"]
    if fmt == "int4":  # every matrix quantized on the ranks: rank 0 receives the version's bytes
        # (the blob less the alignment gaps between its entries, under 64 bytes each)
        assert 0.95 * main["total_bytes"] < sharded <= main["total_bytes"], (sharded, main)
        assert sharded < 0.15 * gathered, (sharded, gathered)
    else:  # fp8 with k/v gathered in fp32
        assert sharded < 0.35 * gathered, (sharded, gathered)
    for rank in (0, 1):
        paths = reports[fmt, rank]
        # The largest either way is the embedding: gathered in fp32, or cast to bf16 first.
        assert paths["sharded"]["largest_tensor"] <= paths["gathered"]["largest_tensor"] // 2, (rank, paths)


def test_stacked_moe_experts_are_quantized_on_the_ranks(tmp_path):
    """The stacked experts [E, out, in] of an MoE (int4's targets there, and FP8's bulk) are sharded
    by expert: each rank holds whole experts and quantizes them alone, in both formats. (FP8's
    q/k/v/o have 128 or 64 rows here, 64 or 32 a rank: gathered in fp32.)"""
    model_dir = build_tiny_model(
        tmp_path / "moe", hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=128,
    )  # fmt: skip
    reports = _two_ranks(model_dir, tmp_path / "out")
    for fmt in fsdp_worker.WIRE_MODES:
        report = reports[fmt, 0]
        assert report["same_manifest"] and report["same_chunks"], (fmt, report)
        assert report["quantized_on_ranks"] == [
            f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")
        ], fmt


def test_a_matrix_quantized_for_another_format_is_refused():
    import torch

    from slipstream.quant import quantize_int4
    from slipstream.weights import WeightError, pack
    from slipstream.weights.packer import Quantized

    w = torch.randn(128, 256)
    int4 = Quantized(*quantize_int4(w), shape=w.shape, dtype="int4")
    with pytest.raises(WeightError, match="quantized as int4, but the fp8 format sends it as float8_e4m3fn"):
        pack({"model.layers.0.self_attn.q_proj.weight": int4}, 1, "fp8")
