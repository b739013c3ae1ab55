"""--int4-qat and unified FP8 (--fp8-format e4m3) under FSDP2 (issue 16): two gloo ranks train like
one process, and what they push is what they trained against.

FSDP2 shards every master along dim 0, through the 128x128 FP8 blocks and the 128-input int4
groups; the quantizer runs on the whole master FSDP2 gathers for each quantized projection's
forward (`quantized.quantize_in_forward`), in fp32 also under --bf16. Checked per mode (int4,
FP8, FP8 with --bf16): the loss curve and the masters equal one process's on the same samples, and
(fp32 compute) the logits the sharded model computes equal those of a plain model loaded with the
masters quantized and dequantized as the push does (what a rollout engine serves), while the
unquantized masters give other logits; and the push (under FSDP2 quantized shard by shard,
`parallel.wire_state`) packs the same bytes as the gathered masters."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mesh_fixtures import build_tiny_model
from slipstream.config import config_from_values
from slipstream.models.hf import load_model
from slipstream.quant import dequantize_blockwise, dequantize_int4, quantize_blockwise, quantize_int4
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.quantized import quantizers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fsdp_worker  # noqa: E402

# Two ranks sum gradients in another order than one process. AdamW's first steps move every
# weight by ~lr whatever its gradient's size, so where a gradient is near zero that order noise
# moves its weight differently: measured up to 1.3e-5 (a handful of weights) against the ~3e-3
# every weight moves (lr 1e-3, three steps); 5e-5 is under 2% of that move.
TOL = dict(rtol=1e-4, atol=5e-5)
WIRE = {"int4": (quantize_int4, dequantize_int4), "fp8": (quantize_blockwise, dequantize_blockwise)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Every projection's input is a multiple of 128 (int4 groups fit), and no projection's rows
    # halve into whole 128-row FP8 blocks: a rank's shard alone cannot quantize right.
    return build_tiny_model(
        tmp_path_factory.mktemp("fsdp_qat") / "model", hidden_size=128, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    )  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_qat_out")
    fsdp_worker.run_two_ranks(model_dir, out, "qat")
    return out


@pytest.mark.parametrize("mode", fsdp_worker.QAT_MODES)
def test_two_ranks_train_like_one_process(mode, model_dir, two_ranks):
    cfg = config_from_values(fsdp_worker.qat_values(str(model_dir), mode))
    single = Actor.from_config(cfg)
    losses = fsdp_worker.qat_steps(single)
    report = json.loads((two_ranks / f"qat_{mode}.json").read_text())
    # The push (FSDP2: quantized shard by shard) packs exactly the masters' quantization.
    assert report["push_format"] == mode.removesuffix("_bf16") and report["push_is_the_masters_quantized"]
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(losses), rtol=1e-4, atol=1e-6)
    pushed = load_file(str(two_ranks / f"pushed_{mode}.safetensors"))
    expected = single.state_dict_for_sync()
    assert pushed.keys() == expected.keys()
    for name, t in expected.items():
        torch.testing.assert_close(pushed[name], t, **TOL, msg=name)
    # What reaches the rollout: the wire's quantized values, dequantized.
    quantize, dequantize = WIRE[mode.removesuffix("_bf16")]
    quantized = sorted(quantizers(cfg.train, single.model))
    assert quantized
    for name in quantized:
        ours, theirs = (dequantize(*quantize(s[name]), torch.float32) for s in (pushed, expected))
        torch.testing.assert_close(ours, theirs, **TOL, msg=name)


@pytest.mark.parametrize("mode", ["int4", "fp8"])  # fp32 compute: a plain model computes the same
def test_two_ranks_compute_with_the_weights_they_push(mode, model_dir, two_ranks):
    _computes_with_what_it_pushes(mode, model_dir, two_ranks)


def test_moe_experts_under_unified_fp8_on_two_ranks(tmp_path):
    """Unified FP8 on an MoE under FSDP2: the stacked experts (an `Experts` parameter, not a linear
    layer) are a unit of their own, gathered whole and FP8-rounded in its forward; the two ranks
    train like one process, compute with what they push and push the masters' blocks."""
    model_dir = build_tiny_model(
        tmp_path / "moe", hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=128,
    )  # fmt: skip
    out = tmp_path / "out"
    fsdp_worker.run_two_ranks(model_dir, out, "qat_moe")
    cfg = config_from_values(fsdp_worker.qat_values(str(model_dir), "fp8"))
    single = Actor.from_config(cfg)
    assert {
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    } <= set(quantizers(cfg.train, single.model))
    report = json.loads((out / "qat_fp8.json").read_text())
    assert report["push_format"] == "fp8" and report["push_is_the_masters_quantized"]
    torch.testing.assert_close(
        torch.tensor(report["losses"]), torch.tensor(fsdp_worker.qat_steps(single)), rtol=1e-4, atol=1e-6
    )
    _computes_with_what_it_pushes("fp8", model_dir, out)


def _computes_with_what_it_pushes(mode: str, model_dir: Path, out: Path) -> None:
    """The logits the two ranks computed equal a plain model's on the pushed masters quantized and
    dequantized as the push does (what a rollout serves), and not the masters' own."""
    cfg = config_from_values(fsdp_worker.qat_values(str(model_dir), mode))
    pushed = load_file(str(out / f"pushed_{mode}.safetensors"))
    logits = torch.tensor(json.loads((out / f"qat_{mode}.json").read_text())["logits"])
    tokens = torch.tensor(fsdp_worker.QAT_TOKENS)
    quantize, dequantize = WIRE[mode]
    served = load_model(model_dir)
    names = quantizers(cfg.train, served)
    served.load_state_dict(
        {n: dequantize(*quantize(t), torch.float32) if n in names else t for n, t in pushed.items()},
        strict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(served(tokens), logits, rtol=1e-5, atol=1e-5)
        # The masters themselves compute other logits: the sharded forward did quantize.
        masters = load_model(model_dir)
        masters.load_state_dict(pushed, strict=False)
        assert (masters(tokens) - logits).abs().max() > 1e-3


def test_the_config_accepts_them_on_several_gpus():
    for flags in fsdp_worker.QAT_MODES.values():
        assert (
            config_from_values(flags | dict(actor_num_gpus_per_node=2)).cluster.actor_num_gpus_per_node == 2
        )
