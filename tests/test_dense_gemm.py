"""kernels/dense_gemm.py against F.linear: every candidate tile, with and without a bias, M not a
multiple of the tile; `linear` takes the plan's tile only at M >= MIN_M and F.linear otherwise.

Without a GPU the kernel runs under Triton's interpreter in fp16 (the interpreter's bf16 dot is not
a bf16 dot); on a GPU in bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest
import torch

CHECKS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from slipstream.kernels import dense_gemm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    torch.manual_seed(0)
    shapes = [(256, 96, 160), (70, 130, 64)] if device == "cpu" else [(256, 4096, 1024), (200, 1024, 3072)]
    for m, n, k in shapes:
        x = torch.randn(m, k, device=device).to(dtype)
        w = (torch.randn(n, k, device=device) * 0.05).to(dtype)
        b = torch.randn(n, device=device).to(dtype)
        for tile in dense_gemm.CANDIDATES:
            for bias in (None, b):
                out = dense_gemm.gemm(x, w, bias, tile)
                ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
                assert out.dtype == dtype and out.shape == (m, n)
                # one rounding of an fp32 accumulation: within two output ulps of the fp32 product
                err = (out.float() - ref).abs()
                assert (err <= 2 * 2.0**-7 * ref.abs() + 1e-3).all(), (m, n, k, tile, err.max())
        if device == "cuda":  # the plan's tile at M >= MIN_M, F.linear below it and off the plan
            dense_gemm.PLAN[(n, k)] = dense_gemm.CANDIDATES[1]
            assert torch.equal(dense_gemm.linear(x, w, b), dense_gemm.gemm(x, w, b, dense_gemm.CANDIDATES[1]))
            small = x[: dense_gemm.MIN_M - 1]
            assert torch.equal(dense_gemm.linear(small, w, b), F.linear(small, w, b))
            dense_gemm.PLAN.clear()
            assert torch.equal(dense_gemm.linear(x, w, b), F.linear(x, w, b))
    print("ok")
    """
)


def _interpreter_runs_loops() -> bool:
    """Triton 3.6's interpreter needs NumPy < 2.3 for a runtime loop bound (test_true_on_policy_gpu)."""
    if find_spec("triton") is None:
        return False
    import numpy

    return tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 3)


@pytest.mark.skipif(not _interpreter_runs_loops(), reason="needs Triton and NumPy < 2.3 (its interpreter)")
def test_dense_gemm_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_gemm_on_the_gpu():
    out = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
