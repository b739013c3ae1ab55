"""W4A16 (`kernels/w4a16.py`): linear layers over packed int4 weights against their definition,
dequantize_int4 then matmul.

On the CPU the layer runs that definition; the Triton kernel is checked on the CPU through Triton's
interpreter (skipped where Triton is not installed, as in the project's CPU venv) and on a GPU by
the tests marked `gpu` (the kernel and the engine's fused, CUDA-graph decode over int4 weights).
"""

import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest
import torch
from torch import nn

from slipstream.kernels.w4a16 import W4A16Linear, convert_to_w4a16, w4a16_linear
from slipstream.models import Qwen3Config, init_model
from slipstream.quant.int4 import dequantize_int4, fake_quantize_int4, quantize_int4

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_w4a16_linear_tracks_the_linear_and_keeps_the_bias():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    with torch.no_grad():
        linear.bias.copy_(torch.randn(96) * 3)  # large next to x @ w.T: a dropped bias must show
    layer = W4A16Linear.from_linear(linear)
    x = torch.randn(3, 5, 256)
    out = layer(x)
    assert out.shape == (3, 5, 96)
    # the layer computes with exactly the fake-quantized weight (what INT4 QAT trains with)
    torch.testing.assert_close(out, nn.functional.linear(x, fake_quantize_int4(linear.weight), linear.bias))
    assert rel(out, linear(x)) < 0.1  # int4: ~1/14 of a group's range per weight at most
    assert rel(out - layer.bias, linear(x)) > 0.5


def test_packed_weights_are_taken_as_they_are():
    torch.manual_seed(0)
    layer = W4A16Linear(128, 8, torch.device("cpu"))
    packed, scales = quantize_int4(torch.randn(8, 128))
    layer.load_packed_(packed, scales)
    assert torch.equal(layer.packed, packed) and torch.equal(layer.scales, scales)
    with pytest.raises(ValueError, match="multiple of 128"):
        W4A16Linear(96, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs packed"):
        w4a16_linear(torch.randn(2, 128), packed[:, :32], scales)


def test_convert_to_w4a16_swaps_the_int4_projections():
    config = Qwen3Config(
        vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    model = init_model(config, seed=0)
    reference = init_model(config, seed=0)
    swapped = convert_to_w4a16(model)
    assert len(swapped) == 14 and isinstance(model.model.layers[1].mlp.down_proj, W4A16Linear)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    layer = swapped["model.layers.0.self_attn.q_proj.weight"]
    w = reference.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(dequantize_int4(layer.packed, layer.scales), fake_quantize_int4(w))
    with torch.no_grad():  # the reference with the same int4-rounded projections
        for name in swapped:
            reference.get_parameter(name).copy_(fake_quantize_int4(reference.get_parameter(name)))
    tokens = torch.arange(1, 9)[None]
    assert rel(model(tokens), reference(tokens)) < 1e-5


# The kernel itself, on CPU tensors under Triton's interpreter (fp32 and fp16: the interpreter's
# bf16 dot is not faithful), covering one tile, split-K with a partial last split, and prefill tiles.
_INTERPRETED = textwrap.dedent(
    """
    import torch
    from slipstream.kernels import gemm_plan
    from slipstream.kernels.w4a16 import w4a16_matmul
    from slipstream.quant.int4 import dequantize_int4, quantize_int4

    torch.manual_seed(0)
    for m, n, k, dtype, bias, prefetch, rows in [
        (1, 64, 128, torch.float32, False, 0, 128),
        (5, 192, 640, torch.float32, True, 0, 128),
        (7, 100, 384, torch.float16, True, 0, 128),
        (300, 130, 256, torch.float32, True, 0, 128),
        (3, 1024, 640, torch.float32, False, 0, 128),  # 2 splits of 4 steps, the last one past K
        (3, 1024, 640, torch.float32, True, 0, 128),
        # one token: the GEMV (int32 words, no tensor cores), loading 0, 1 or 2 groups ahead; 16
        # "SMs": 2 splits of 4 and 8 steps, the last past K, and 16 splits of one step
        (1, 4096, 640, torch.float32, True, 0, 128),
        (1, 4096, 640, torch.float32, True, 1, 128),
        (1, 4096, 640, torch.float32, True, 2, 128),
        (1, 4096, 2048, torch.float32, False, 1, 128),
        (1, 4096, 2048, torch.float32, False, 2, 128),
        (1, 130, 2048, torch.float32, True, 1, 128),
        (1, 130, 2048, torch.float32, True, 2, 128),
        (1, 100, 384, torch.float16, True, 0, 128),
        (1, 100, 384, torch.float16, True, 2, 128),
        (1, 200, 256, torch.float32, False, 0, 128),
        (1, 200, 256, torch.float32, False, 2, 128),  # one step a program: nothing ahead
        (1, 200, 2048, torch.float32, True, 0, 64),  # 64 rows a program, with and without the look-ahead
        (1, 4096, 640, torch.float32, True, 2, 64),
    ]:
        gemm_plan.GEMV_PREFETCH, gemm_plan.GEMV_BLOCK_N = prefetch, rows
        packed, scales = quantize_int4(torch.randn(n, k))
        x = torch.randn(m, k).to(dtype)
        b = torch.randn(n).to(dtype) if bias else None
        ref = x.float() @ dequantize_int4(packed, scales).t() + (b.float() if bias else 0)
        out = w4a16_matmul(x, packed, scales, b)
        assert out.dtype == dtype and out.shape == (m, n)
        err = float((out.float() - ref).norm() / ref.norm())
        assert err < (1e-6 if dtype == torch.float32 else 2e-3), (m, n, k, dtype, err)
    print("ok")
    """
)


@pytest.mark.skipif(
    find_spec("triton") is None or torch.cuda.is_available(),
    reason="needs Triton, whose interpreter runs the kernel on CPU (on a GPU the gpu tests run it)",
)
def test_w4a16_kernel_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.gpu
@cuda
@torch.no_grad()
def test_w4a16_kernel_matches_dequantize_then_matmul():
    torch.manual_seed(0)
    for n, k in [(1024, 2048), (6144, 1024), (4096, 12288), (200, 384)]:
        packed, scales = quantize_int4(torch.randn(n, k, device="cuda") * 0.02)
        w = dequantize_int4(packed, scales)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for m in (1, 5, 16, 64, 256, 1000):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w.t() + bias.float()
            out = w4a16_linear(x, packed, scales, bias)
            assert out.dtype == torch.bfloat16
            assert rel(out.float(), ref) < 5e-3, (n, k, m)  # bf16 output rounding
        for m in (1, 7):  # fp32: the GEMV's exact products, the tensor-core kernel's IEEE dots
            x32 = torch.randn(m, k, device="cuda")
            assert rel(w4a16_linear(x32, packed, scales), x32 @ w.t()) < 1e-5, (n, k, m)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    "knobs",
    [
        {"GEMV_OWN_SCALES": False, "GEMV_PREFETCH": 0},
        {"GEMV_OWN_SCALES": True, "GEMV_PREFETCH": 0},
        {"GEMV_PREFETCH": 1},
        {"GEMV_BLOCK_N": 64, "GEMV_PROGRAMS_PER_SM": 8},
    ],
)
@torch.no_grad()
def test_w4a16_gemv_under_the_benchmarked_tilings(monkeypatch, knobs):
    """The one-token GEMV under the other choices bench/precision_gpu.py --variants times (the
    defaults, own scales and two groups ahead, run in the test above): a 16-way split-K shape and a
    2-way one, bf16 and fp32 activations."""
    from slipstream.kernels import gemm_plan

    for name, value in knobs.items():
        monkeypatch.setattr(gemm_plan, name, value)
    torch.manual_seed(0)
    for n, k in [(4096, 4096), (24576, 4096)]:
        packed, scales = quantize_int4(torch.randn(n, k, device="cuda") * 0.02)
        w = dequantize_int4(packed, scales)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        out = w4a16_linear(x, packed, scales, bias)
        assert rel(out.float(), x.float() @ w.t() + bias.float()) < 5e-3, (knobs, n, k)
        x32 = torch.randn(1, k, device="cuda")
        assert rel(w4a16_linear(x32, packed, scales), x32 @ w.t()) < 1e-5, (knobs, n, k)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    "knobs",
    [{}, {"GEMV_PREFETCH": 1}],
    ids=["defaults", "ahead_1"],
)
def test_int4_engine_serves_the_dequantized_weights(monkeypatch, knobs):
    """The engine over int4 weights (fused decode, CUDA graphs, the W4A16 GEMM) against the same
    model in bf16 with the int4-rounded weights (what the QAT trainer computes with): greedy tokens
    follow it until a near-tie flips, log-probs within the bf16 tolerance; the one-token GEMV's
    steps with two groups' words ahead (the default) and one."""
    from slipstream.kernels import gemm_plan
    from slipstream.services.rollout.engine import NativeEngine, Request
    from tests.test_engine import shared_prefix_log_prob_diffs

    for name, value in knobs.items():
        monkeypatch.setattr(gemm_plan, name, value)

    config = Qwen3Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
    )  # fmt: skip

    def model():
        return init_model(config, seed=0).cuda().to(torch.bfloat16)

    rounded = model()
    with torch.no_grad():
        for name, layer in convert_to_w4a16(model()).items():
            rounded.get_parameter(name).copy_(dequantize_int4(layer.packed, layer.scales, torch.bfloat16))
    int4 = model()
    convert_to_w4a16(int4)
    reqs = [
        Request(f"r{i}", [(7 * j + i) % 512 for j in range(3 + 5 * i)], 24, temperature=1.0, seed=i)
        for i in range(6)
    ]
    engine = NativeEngine(int4, eos_token_ids=[], max_seq_len=64)
    assert engine.fused is not None and engine.graphs is not None
    runs = [NativeEngine(rounded, eos_token_ids=[], max_seq_len=64).generate(reqs), engine.generate(reqs)]
    assert engine.graphs.graphs, "decode ran eagerly, not from CUDA graphs"
    diffs = shared_prefix_log_prob_diffs(*runs)
    assert len(diffs) >= len(reqs) * 8
    assert diffs.mean() < 0.02 and diffs.max() < 0.2
    # one row alone: its decode steps are the one-token GEMV's
    alone = [
        NativeEngine(rounded, eos_token_ids=[], max_seq_len=64).generate(reqs[:1]),
        engine.generate(reqs[:1]),
    ]
    diffs = shared_prefix_log_prob_diffs(*alone)
    assert len(diffs) >= 4
    assert diffs.mean() < 0.02 and diffs.max() < 0.2
