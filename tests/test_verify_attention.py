"""The speculative verify's attention kernel (kernels/verify_attention.py) against SDPA with a
causal mask over the cache: T query tokens per sequence at consecutive positions, each attending
over its slot up to its own position; GQA groups, lengths that end inside a key block, key splits
(rows with no key in a split), fp32 and half precision (bf16 on a GPU, fp16 under the interpreter,
whose bf16 dots are garbage for the decode kernel too), and an FP8 cache on a GPU.

Without a GPU the kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`, in a subprocess;
skipped where Triton is not installed, as in the project's CPU venv); on a GPU the same checks run
on CUDA.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_checks import needs_interpreter, run_checks

CHECKS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from slipstream.kernels.verify_attention import verify_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    half = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter garbles bf16 dots
    cases = [  # dtype, slots, batch, T, kv heads, group, head dim, capacity, splits
        (torch.float32, 5, 3, 4, 2, 2, 32, 200, 1),
        (torch.float32, 3, 3, 4, 2, 2, 32, 200, 3),
        (half, 4, 2, 2, 1, 4, 64, 150, 1),
        (half, 2, 1, 5, 2, 4, 64, 300, 4),
    ]
    if device == "cuda":
        cases.append((torch.float8_e4m3fn, 4, 4, 4, 2, 2, 128, 512, None))
    for dtype, slots, b, t, hkv, group, d, cap, splits in cases:
        qdtype = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
        k = torch.randn(slots, hkv, cap, d, device=device).to(dtype)
        v = torch.randn(slots, hkv, cap, d, device=device).to(dtype)
        first = torch.randint(0, cap - t, (b,), device=device)
        first[0] = 0  # a first query over one key only
        pos = first[None, :] + torch.arange(t, device=device)[:, None]  # [T, B]
        q = torch.randn(t, b, hkv * group, d, device=device).to(qdtype)
        out = verify_attention(q, k, v, pos + 1, splits=splits)
        keys, values = k[:b].float(), v[:b].float()
        mask = torch.arange(cap, device=device)[None, None, :] <= pos.T[:, :, None]  # [B, T, L]
        want = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3).float(), keys, values, attn_mask=mask[:, None], enable_gqa=True
        ).permute(2, 0, 1, 3)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert out.shape == q.shape and out.dtype == qdtype
        err = (out.float() - want).abs().max().item()
        assert err < tol, (dtype, splits, err)
    print("ok")
    """
)


@needs_interpreter
def test_verify_attention_under_the_interpreter():
    run_checks(CHECKS, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_verify_attention_on_the_gpu():
    run_checks(CHECKS, interpret=False)
