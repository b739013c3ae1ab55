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

from slipstream.kernels import fp8_linear
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
    from slipstream.kernels.fp8_gemm import fp8_block_matmul
    from slipstream.kernels.fp8_linear import quantize_rows
    from slipstream.quant import dequantize_blockwise, quantize_blockwise

    torch.manual_seed(0)
    for m, n, k, bias, rows in [
        (1, 64, 128, False, False), (5, 192, 600, True, False), (3, 70, 256, False, True),
        (300, 130, 256, True, False), (3, 1024, 600, False, False),  # the last split past K
    ]:
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
        for m in (1, 64, 256):  # cuBLAS refuses M = 1 (torch 2.11, CUDA 13): the Triton kernel runs
            xq, xs = quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            out = fp8_matmul(xq, xs, q, ws, torch.bfloat16, bias)
            assert rel(out.float(), block_reference(xq, xs, q, scale_inv, bias)) < 5e-3, (n, k, m)
    print(
        "cuBLAS refused (device, M, N, K):", sorted((m, n, k) for _, m, n, k in fp8_linear._scaled_mm_failed)
    )


def test_whole_blocks_tells_block_scales_from_row_scales():
    """The cuBLAS route reads [N, K/128] scales back as 128x128 blocks only where rows repeat
    their block's scale (what Fp8Linear holds); distinct row scales, [N, 1] ones, or N not a
    multiple of 128 keep the Triton kernel."""
    _, scale_inv = quantize_blockwise(torch.randn(256, 384))
    assert fp8_linear._whole_blocks(scale_inv.repeat_interleave(128, dim=0).contiguous())
    assert not fp8_linear._whole_blocks(torch.rand(256, 3) + 0.5)
    assert not fp8_linear._whole_blocks(torch.rand(256, 1))
    assert not fp8_linear._whole_blocks(scale_inv.repeat_interleave(128, dim=0)[:200].contiguous())
