"""The FP8 GEMM on the wire's block scales (`kernels/fp8_gemm.py`, through `fp8_linear.fp8_matmul`)
against its definition, dequantize both operands and multiply.

On the CPU `fp8_matmul` is that definition; the Triton kernel is checked on the CPU through
Triton's interpreter (skipped where Triton is not installed, as in the project's CPU venv) and on
a GPU with FP8 tensor cores by the tests marked `gpu`.
"""

import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest
import torch

from slipstream.kernels import fp8_gemm, fp8_linear
from slipstream.kernels.fp8_linear import Fp8Linear, fp8_matmul, quantize_rows, scaled_mm_supported
from slipstream.quant import dequantize_blockwise, quantize_blockwise


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def block_reference(xq, xs, q, scale_inv, bias=None):
    out = (xq.float() * xs) @ dequantize_blockwise(q, scale_inv).t()
    return out if bias is None else out + bias.float()


def test_fp8_linear_holds_the_wire_blocks_exactly():
    """A layer loaded from a full-precision weight holds quantize_blockwise's values and scales (each
    block's scale over its 128 rows); one loaded from the wire's blocks holds them as they are; its
    product is the block-dequantized one."""
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-2, 1, 300)[:, None]  # rows of different ranges
    q, scale_inv = quantize_blockwise(w)
    layer = Fp8Linear(200, 300, torch.device("cpu"))
    layer.load_(w)
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
    assert layer.weight_scale.shape == (300, 2)
    assert torch.equal(layer.weight_scale, scale_inv.repeat_interleave(128, dim=0)[:300])
    other = Fp8Linear(200, 300, torch.device("cpu"))
    other.load_blocks_(q, scale_inv)
    assert torch.equal(other.weight_scale, layer.weight_scale)
    x = torch.randn(9, 200)
    xq, xs = quantize_rows(x)
    torch.testing.assert_close(layer(x), block_reference(xq, xs, q, scale_inv))


def test_fp8_matmul_takes_row_or_block_scales():
    torch.manual_seed(0)
    x, w = torch.randn(7, 300), torch.randn(48, 300)
    xq, xs = quantize_rows(x)
    q, scale_inv = quantize_blockwise(w)
    ws = scale_inv.repeat_interleave(128, dim=0)[:48]
    bias = torch.randn(48)
    torch.testing.assert_close(
        fp8_matmul(xq, xs, q, ws, torch.float32, bias), block_reference(xq, xs, q, scale_inv, bias)
    )
    wq, wrow = quantize_rows(w)
    torch.testing.assert_close(
        fp8_matmul(xq, xs, wq, wrow, torch.float32), (xq.float() * xs) @ (wq.float() * wrow).t()
    )


# The kernel itself on CPU tensors under Triton's interpreter: one tile, split-K with a partial
# last split and partial K, [N, 1] row scales, and prefill tiles.
_INTERPRETED = textwrap.dedent(
    """
    import torch
    from slipstream.kernels import gemm_plan
    from slipstream.kernels.fp8_gemm import fp8_block_matmul
    from slipstream.kernels.fp8_linear import _quantize_rows_triton, quantize_rows
    from slipstream.quant import dequantize_blockwise, quantize_blockwise

    torch.manual_seed(0)
    for m, n, k, bias, rows, unroll in [
        (1, 64, 128, False, False, False), (5, 192, 600, True, False, False),
        (3, 70, 256, False, True, False),
        (300, 130, 256, True, False, False), (3, 1024, 600, False, False, False),  # the last split past K
        (3, 1024, 600, True, False, True),  # the split-K merge unrolled
    ]:
        gemm_plan.MERGE_UNROLL = unroll
        w = torch.randn(n, k)
        xq, xs = quantize_rows(torch.randn(m, k))
        b = torch.randn(n) if bias else None
        if rows:
            q, ws = quantize_rows(w)
            ref = (xq.float() * xs) @ (q.float() * ws).t()
        else:
            q, scale_inv = quantize_blockwise(w)
            ws = scale_inv.repeat_interleave(128, dim=0)[:n].contiguous()
            ref = (xq.float() * xs) @ dequantize_blockwise(q, scale_inv).t()
        ref = ref + (b if bias else 0)
        out = fp8_block_matmul(xq, xs, q, ws, torch.float32, b)
        err = float((out - ref).norm() / ref.norm())
        assert err < 1e-6, (m, n, k, err)
    # the quantize kernel, with the scales laid over 128-wide groups (cuBLAS's layout) and without:
    # the scales exactly the PyTorch definition's, the values the same either way (not compared
    # with PyTorch's: the interpreter's cast to e4m3 rounds down at binade edges, the GPU's does not)
    for m, k in [(5, 600), (3, 256)]:
        x = torch.randn(m, k) * torch.logspace(-3, 2, m)[:, None]
        _, xs = quantize_rows(x)  # the PyTorch definition on CPU tensors
        values = []
        for groups in (1, -(-k // 128)):
            scale = torch.empty((groups, m)).t()
            values.append(_quantize_rows_triton(x, scale[:, :1], groups).view(torch.uint8))
            assert torch.equal(scale, xs.expand(m, groups)), (m, k, groups)
        assert torch.equal(*values), (m, k)
    print("ok")
    """
)


@pytest.mark.skipif(
    find_spec("triton") is None or torch.cuda.is_available(),
    reason="needs Triton, whose interpreter runs the kernel on CPU (on a GPU the gpu tests run it)",
)
def test_fp8_gemm_kernel_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not scaled_mm_supported(torch.device("cuda")),
    reason="needs a GPU with FP8 tensor cores",
)
@torch.no_grad()
def test_fp8_gemm_kernel_matches_the_dequantized_product():
    torch.manual_seed(0)
    for n, k in [(4096, 1024), (1024, 2048), (24576, 4096), (4096, 12288), (200, 320)]:
        q, scale_inv = quantize_blockwise(torch.randn(n, k, device="cuda") * 0.02)
        ws = scale_inv.repeat_interleave(128, dim=0)[:n].contiguous()
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for m in (1, 5, 16, 64, 256, 1000):
            xq, xs = quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            out = fp8_matmul(xq, xs, q, ws, torch.bfloat16, bias)
            assert out.dtype == torch.bfloat16
            assert rel(out.float(), block_reference(xq, xs, q, scale_inv, bias)) < 5e-3, (n, k, m)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not scaled_mm_supported(torch.device("cuda")),
    reason="needs a GPU with FP8 tensor cores",
)
@pytest.mark.parametrize(
    "knobs",
    [{"MERGE_UNROLL": False}, {"DECODE_BLOCK_N": 128}, {"SPLIT_PROGRAMS_PER_SM": 4}, {"DECODE_STAGES": 4}],
)
@torch.no_grad()
def test_fp8_gemm_under_the_benchmarked_tilings(monkeypatch, knobs):
    """The kernel under the tilings bench/precision_gpu.py --variants times (any may become the
    default), on a split-K shape at one token and at 64."""
    from slipstream.kernels import gemm_plan

    for name, value in knobs.items():
        monkeypatch.setattr(gemm_plan, name, value)
    torch.manual_seed(0)
    n, k = 1024, 4096
    q, scale_inv = quantize_blockwise(torch.randn(n, k, device="cuda") * 0.02)
    ws = scale_inv.repeat_interleave(128, dim=0)[:n].contiguous()
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for m in (1, 64):
        xq, xs = quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        out = fp8_gemm.fp8_block_matmul(xq, xs, q, ws, torch.bfloat16, bias)
        assert rel(out.float(), block_reference(xq, xs, q, scale_inv, bias)) < 5e-3, (knobs, m)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not scaled_mm_supported(torch.device("cuda")),
    reason="needs a GPU with FP8 tensor cores",
)
@torch.no_grad()
def test_fp8_cublas_route_computes_the_same_product(monkeypatch):
    """fp8_matmul's cuBLAS route (`CUBLAS_FROM_M`: the same e4m3 values, each token's scale over
    its 128-wide groups, the wire's 128x128 blocks) against the dequantized product, where this
    torch takes it (elsewhere the route falls back to the Triton kernel, which must pass too)."""
    monkeypatch.setattr(fp8_linear, "CUBLAS_FROM_M", 1)
    torch.manual_seed(0)
    for n, k in [(4096, 1024), (24576, 4096), (4096, 12288)]:
        q, scale_inv = quantize_blockwise(torch.randn(n, k, device="cuda") * 0.02)
        ws = scale_inv.repeat_interleave(128, dim=0)[:n].contiguous()
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for m in (1, 16, 64, 256):  # cuBLAS refuses M = 1 (torch 2.11, CUDA 13): the Triton kernel runs
            xq, xs = quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            out = fp8_matmul(xq, xs, q, ws, torch.bfloat16, bias)
            assert rel(out.float(), block_reference(xq, xs, q, scale_inv, bias)) < 5e-3, (n, k, m)
    print(
        "cuBLAS refused (device, M, N, K):", sorted((m, n, k) for _, m, n, k in fp8_linear._scaled_mm_failed)
    )


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not scaled_mm_supported(torch.device("cuda")),
    reason="needs a GPU with FP8 tensor cores",
)
@torch.no_grad()
def test_fp8_cublas_route_in_a_cuda_graph_follows_weight_updates(monkeypatch):
    """A CUDA graph captured over the cuBLAS route (the kept block scales, the token scales in the
    quantize step's group layout) computes with a weight update loaded after the capture, as the
    engine's decode graphs must."""
    monkeypatch.setattr(fp8_linear, "CUBLAS_FROM_M", 16)
    torch.manual_seed(0)
    layer = Fp8Linear(4096, 6144, torch.device("cuda"))
    layer.load_(torch.randn(6144, 4096, device="cuda") * 0.02)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_rows(x)
    assert torch.equal(xs.group_scales, xs.expand(64, 32))
    layer(x)  # eager first: reads the block scales (and finds whether cuBLAS takes the shape)
    assert (x.device, 64, 6144, 4096) not in fp8_linear._scaled_mm_failed, "cuBLAS refused M = 64"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    q, scale_inv = quantize_blockwise(torch.randn(6144, 4096, device="cuda") * 0.05)
    layer.load_blocks_(q, scale_inv)
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out.float(), block_reference(xq, xs, q, scale_inv)) < 5e-3


def test_block_scales_tells_block_scales_from_row_scales():
    """The cuBLAS route reads [N, K/128] scales back as 128x128 blocks ([K/128, N/128], the layout
    cuBLAS takes) only where rows repeat their block's scale (what Fp8Linear holds); distinct row
    scales, [N, 1] ones, or N not a multiple of 128 keep the Triton kernel."""
    _, scale_inv = quantize_blockwise(torch.randn(256, 384))
    blocks = fp8_linear._block_scales(scale_inv.repeat_interleave(128, dim=0).contiguous())
    assert torch.equal(blocks, scale_inv.t()) and blocks.stride() == (1, 3)
    assert fp8_linear._block_scales(torch.rand(256, 3) + 0.5) is None
    assert fp8_linear._block_scales(torch.rand(256, 1)) is None
    assert fp8_linear._block_scales(scale_inv.repeat_interleave(128, dim=0)[:200].contiguous()) is None


@torch.no_grad()
def test_block_scales_follow_weight_updates_in_place():
    """The block scales are read once per buffer and kept (no copy per GEMM), and follow the
    buffer in place (a CUDA graph that captured them reads the new values): a weight update
    through a fused layer's view (`load_blocks_`) and any other in-place write seen by the version
    counter both land in the same tensor."""
    torch.manual_seed(0)
    layers = [Fp8Linear(384, rows, torch.device("cpu")) for rows in (256, 128)]
    for layer in layers:
        layer.load_(torch.randn(layer.out_features, 384))
    fused = torch.cat([layer.weight_scale for layer in layers])  # q|k|v-style, as fused_step fuses
    layers[0].weight_scale, layers[1].weight_scale = fused[:256], fused[256:]
    blocks = fp8_linear._block_scales(fused)
    assert fp8_linear._block_scales(fused) is blocks
    q, scale_inv = quantize_blockwise(torch.randn(128, 384) * 5)
    layers[1].load_blocks_(q, scale_inv)  # a weight update into the second part
    assert torch.equal(blocks[:, 2], scale_inv[0]) and torch.equal(blocks, fused[::128].t())
    fused.mul_(2)  # a write that bypasses load_blocks_: the next call sees the version move
    assert fp8_linear._block_scales(fused) is blocks and torch.equal(blocks, fused[::128].t())
    key = (fused.data_ptr(), tuple(fused.shape))
    del layers, layer, fused  # the views keep the buffer alive
    assert key not in fp8_linear._blocks  # a dead buffer's entry goes with it


def test_row_scales_carry_cublas_group_layout():
    """Where the next GEMM takes cuBLAS's route, the quantize step lays each token's scale over its
    128-wide groups, group-major (what torch._scaled_mm's 1x128 mode reads), in the buffer whose
    first group is the [M, 1] scale: no copy per GEMM. Below CUBLAS_FROM_M it writes one column."""
    scale, groups = fp8_linear.new_row_scales(300, 1000, torch.device("cpu"))
    assert groups == 8 and scale.shape == (300, 1)
    assert scale.group_scales.shape == (300, 8) and scale.group_scales.stride() == (1, 300)
    assert scale.group_scales.data_ptr() == scale.data_ptr()
    scale, groups = fp8_linear.new_row_scales(64, 1000, torch.device("cpu"))
    assert groups == 1 and not hasattr(scale, "group_scales")


def test_cublas_route_takes_the_gemms_its_knobs_name(monkeypatch):
    """From CUBLAS_FROM_M tokens every GEMM, from CUBLAS_SMALL_FROM_M those of at most
    CUBLAS_SMALL_WEIGHTS weights (the 8B shape's q|k|v and o, not gate|up or down)."""
    monkeypatch.setattr(fp8_linear, "CUBLAS_FROM_M", 256)
    monkeypatch.setattr(fp8_linear, "CUBLAS_SMALL_FROM_M", None)
    assert fp8_linear._takes_cublas(256, 4096, 24576) and not fp8_linear._takes_cublas(64, 4096, 6144)
    monkeypatch.setattr(fp8_linear, "CUBLAS_SMALL_FROM_M", 16)
    assert fp8_linear._takes_cublas(64, 4096, 6144) and fp8_linear._takes_cublas(16, 4096, 4096)
    assert not fp8_linear._takes_cublas(64, 4096, 24576) and not fp8_linear._takes_cublas(64, 12288, 4096)
    assert not fp8_linear._takes_cublas(1, 4096, 4096)
    assert fp8_linear.new_row_scales(16, 4096, torch.device("cpu"))[1] == 32  # laid out for cuBLAS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_fused_norm_and_silu_quantize_as_quantize_rows_in_cublas_layout():
    """The decode step's fused add+RMSNorm and SiLU*up kernels quantize their rows exactly as
    `quantize_rows` does, and from CUBLAS_FROM_M tokens write each token's scale over its 128-wide
    groups (the layout cuBLAS's route reads without a copy), below it one column."""
    from slipstream.kernels.decode_layer import add_rmsnorm, silu_mul

    torch.manual_seed(0)
    for m in (64, 256):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
        gate_up = torch.randn(m, 2 * 3072, device="cuda", dtype=torch.bfloat16)
        for plain, (q, s) in [
            (add_rmsnorm(x.clone(), None, w, 1e-6), add_rmsnorm(x.clone(), None, w, 1e-6, quant=True)),
            (silu_mul(gate_up), silu_mul(gate_up, quant=True)),
        ]:
            want_q, want_s = quantize_rows(plain)
            assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
            groups = getattr(s, "group_scales", None)
            assert (groups is not None) == (m >= fp8_linear.CUBLAS_FROM_M), m
            if groups is not None:
                assert torch.equal(groups, s.expand_as(groups))
