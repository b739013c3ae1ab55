"""A rollout server names every Triton kernel it compiles after its warm-up (GPU only: the
interpreter compiles nothing)."""

from __future__ import annotations

import logging

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_a_kernel_compiled_after_the_warm_up_is_logged(caplog):
    import triton
    import triton.language as tl

    from slipstream.services.rollout import late_compiles

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    x = torch.zeros(8, device="cuda")
    add_one[(1,)](x, 8, BLOCK=8)  # compiled before the watch: not logged
    assert late_compiles.watch("s0")
    try:
        with caplog.at_level(logging.WARNING, logger=late_compiles.__name__):
            add_one[(1,)](x, 8, BLOCK=8)  # cached in the process: nothing compiles
            assert not caplog.records
            add_one[(1,)](x, 8, BLOCK=16)  # a new specialisation
    finally:
        triton.knobs.runtime.jit_cache_hook = triton.knobs.runtime.jit_post_compile_hook = None
    assert torch.equal(x, torch.full((8,), 3.0, device="cuda"))
    (record,) = caplog.records
    assert "rollout server s0: Triton compiled add_one after the warm-up" in record.getMessage()
