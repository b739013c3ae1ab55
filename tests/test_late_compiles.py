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
    message = record.getMessage()  # the kernel by its qualified name, then its specialisation key
    assert (
        message.startswith("rollout server s0: Triton compiled ") and ".add_one after the warm-up" in message
    )
    assert "('constexpr', 16)" in message


def test_the_sampler_does_not_compile_again_for_rows_at_another_offset(caplog):
    """The rollout server's warm-up samples rows from the slot tables' start; a real batch's rows
    start anywhere (the running rows before them), so its per-row slices have other alignments.
    None of them may compile the sampler again after the warm-up."""
    import triton

    from slipstream.kernels import sampling
    from slipstream.services.rollout import late_compiles

    vocab, rows = 151_936, 64
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    temps = torch.ones(rows + 8, device="cuda")
    seeds = torch.arange(rows + 8, device="cuda", dtype=torch.int64)
    positions = torch.arange(rows + 8, device="cuda", dtype=torch.int64)
    tokens, _ = sampling.sample(logits, temps[:rows], seeds[:rows], positions[:rows])  # the warm-up's
    sampling.log_probs(logits, temps[:rows], tokens)
    given = torch.zeros(rows + 8, device="cuda", dtype=torch.int64)
    assert late_compiles.watch("s0")
    try:
        with caplog.at_level(logging.WARNING, logger=late_compiles.__name__):
            for first in range(1, 8):  # every alignment class of a 4- and an 8-byte element
                window = slice(first, first + rows)
                drawn, _ = sampling.sample(logits, temps[window], seeds[window], positions[window])
                given[window] = drawn
                sampling.log_probs(logits, temps[window], given[window])
    finally:
        triton.knobs.runtime.jit_cache_hook = triton.knobs.runtime.jit_post_compile_hook = None
    assert not [r.getMessage() for r in caplog.records]
    # the unaligned slices compute what aligned copies of them do
    aligned = [t[window].clone() for t in (temps, seeds, positions)]
    assert torch.equal(drawn, sampling.sample(logits, *aligned)[0])
