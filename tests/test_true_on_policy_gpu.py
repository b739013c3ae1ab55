"""--true-on-policy-mode on CUDA (kernels/invariant_gpu.py): the Triton kernels compute what their
PyTorch definitions do, a row's numbers do not depend on its batch or on the keys stored past its
position, and on a GPU the sampler's log-probs equal the trainer's bit for bit (dense and MoE,
bf16, CUDA graphs on; MoE with them off too). The MoE experts' grouped GEMM computes each row as
the per-expert `linear` does, bit for bit, and so does the whole experts layer against its loop.

Without a GPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, in a subprocess;
skipped where Triton is not installed, as in the project's CPU venv).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_checks import needs_interpreter, run_checks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

KERNEL_CHECKS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from slipstream.kernels import invariant_gpu as gpu, sampling
    from slipstream.models.decoder import RMSNorm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    # linear: F.linear's values; row i alone equals row i of a 70-row batch, bit for bit
    x, w = torch.randn(70, 96, device=device), torch.randn(40, 96, device=device)
    full = gpu.linear(x, w)
    assert torch.allclose(full, F.linear(x, w), atol=1e-4), (full - F.linear(x, w)).abs().max()
    for i in (0, 13, 69):
        assert torch.equal(gpu.linear(x[i : i + 1], w)[0], full[i]), i
    # causal attention: SDPA's values (GQA, T not a multiple of the tile)
    for t_len in (5, 70):
        q = torch.randn(2, 4, t_len, 32, device=device)
        k, v = torch.randn(2, 2, t_len, 32, device=device), torch.randn(2, 2, t_len, 32, device=device)
        causal = gpu.causal_attention(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert torch.allclose(causal, ref, atol=1e-4), (causal - ref).abs().max()
        # decode: a query at position t over a cache holding garbage past t equals causal row t
        cache_k = torch.randn(3, 2, 80, 32, device=device)
        cache_v = torch.randn(3, 2, 80, 32, device=device)
        cache_k[1, :, :t_len], cache_v[1, :, :t_len] = k[1], v[1]
        for t in sorted({0, t_len // 2, t_len - 1}):
            lengths = torch.tensor([7, t + 1, 80], device=device)
            qs = torch.randn(3, 4, 1, 32, device=device)
            qs[1] = q[1, :, t : t + 1]
            one = gpu.decode_attention(qs, cache_k, cache_v, lengths)
            assert torch.equal(one[1, :, 0], causal[1, :, t]), (t_len, t)
    # a KV head shared by more query heads than a tile's rows (20: two tiles of QUERY_ROWS 16)
    q, k, v = torch.randn(1, 40, 9, 32, device=device), torch.randn(1, 2, 9, 32, device=device), torch.randn(1, 2, 9, 32, device=device)
    causal = gpu.causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(causal, ref, atol=1e-4), (causal - ref).abs().max()
    one = gpu.decode_attention(q[:, :, 6:7], k, v, torch.tensor([7], device=device))
    assert torch.equal(one[0, :, 0], causal[0, :, 6])
    # RMSNorm: the model's module
    norm = RMSNorm(48, 1e-6).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    h = torch.randn(5, 3, 48, device=device)
    assert torch.allclose(gpu.rms_norm(h, norm.weight, 1e-6), norm(h), atol=1e-5)
    # the sampler's log-probs of given tokens: log-softmax(logits / T) picked; sample() reports them
    logits = torch.randn(6, 5000, device=device)
    temps = torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 2.0], device=device)
    tokens = torch.randint(0, 5000, (6,), device=device)
    lp = sampling.log_probs(logits, temps, tokens)
    scale = torch.where(temps > 0, temps, torch.ones_like(temps))
    ref = torch.log_softmax(logits / scale[:, None], -1).gather(-1, tokens[:, None])[:, 0]
    assert torch.allclose(lp, ref, atol=1e-5), (lp - ref).abs().max()
    drawn, reported = sampling.sample(logits, temps, torch.arange(6, device=device), torch.arange(6, device=device))
    assert torch.equal(reported, sampling.log_probs(logits, temps, drawn))
    print("ok")
    """
)


GROUPED_CHECKS = textwrap.dedent(
    """
    import torch
    from slipstream.kernels import invariant, invariant_gpu as gpu
    from slipstream.models.moe import Experts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the interpreter runs the CUDA path on CPU tensors
        gpu.available = lambda x: True
    torch.manual_seed(0)


    def grouped(x, w, counts):
        return gpu.grouped_linear(x, w, gpu.expert_tiles(counts, x.shape[0]))

    # grouped_linear: each expert's rows as `linear` computes them, bit for bit; experts with no
    # rows, one row, and more than one tile of rows (70)
    counts = [0, 1, 70, 5, 0]
    c = torch.tensor(counts, dtype=torch.int32, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(sum(counts), 96, device=device).to(dtype)
        w = torch.randn(len(counts), 40, 96, device=device).to(dtype)
        out = grouped(x, w, c)
        for e, (rows, got) in enumerate(zip(x.split(counts), out.split(counts))):
            assert torch.equal(got, gpu.linear(rows, w[e])), (dtype, e)
        # a row alone (its expert's only row, the rest empty) equals the row in the batch: expert 1's
        # one row, expert 2's at positions 0, 13, 63 of its first tile and 0, 5 of its second
        for i, e in ((0, 1), (1, 2), (14, 2), (64, 2), (65, 2), (70, 2), (75, 3)):
            one = torch.zeros_like(c)
            one[e] = 1
            assert torch.equal(grouped(x[i : i + 1], w, one)[0], out[i]), (dtype, i)
        assert grouped(x[:0], w, torch.zeros_like(c)).shape == (0, 40)
    # InvariantExperts: its grouped forward equals the expert loop through `linear` (what it computes
    # off CUDA, `Experts.forward`), bit for bit; its gradients equal the loop's up to rounding.
    # Expert 0 takes every token (two tiles), expert 5 none; a token's ids are not sorted.
    tokens = torch.arange(80, device=device)
    ids = torch.stack([torch.zeros_like(tokens), 1 + tokens % 4], -1)
    ids[1::2] = ids[1::2].flip(-1)
    for dtype in (torch.float32, torch.bfloat16):
        experts = Experts(6, 64, 32).to(device)
        with torch.no_grad():
            experts.gate_up_proj.normal_(0, 0.1)
            experts.down_proj.normal_(0, 0.1)
        experts = invariant.make_invariant(experts.to(dtype))
        weights = torch.rand(80, 2, device=device).softmax(-1).to(dtype)
        x = torch.randn(80, 64, device=device).to(dtype)
        runs = []
        for forward in (experts.forward, lambda *a: Experts.forward(experts, *a)):
            xg = x.clone().requires_grad_()
            out = forward(xg, ids, weights)
            params = (experts.gate_up_proj, experts.down_proj)
            runs.append((out, *torch.autograd.grad(out.float().square().sum(), (xg, *params))))
        assert torch.equal(runs[0][0], runs[1][0]), dtype
        if dtype == torch.float32:  # the backward is no part of the promise: fp32 shows it is right
            for got, ref in zip(runs[0][1:], runs[1][1:]):
                assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (got - ref).abs().max()
    print("ok")
    """
)


FUSED_CHECKS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from slipstream.kernels import invariant, invariant_fused as fused, invariant_gpu as gpu
    from slipstream.models import ModelConfig, init_model
    from slipstream.models.rope import apply_rope

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the interpreter runs the CUDA path on CPU tensors
        gpu.available = fused.usable = lambda x: True
    torch.manual_seed(0)
    # multi_linear: each weight's columns as `linear` computes them, bit for bit; a row alone too
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(70, 96, device=device).to(dtype)
        ws = [torch.randn(n, 96, device=device).to(dtype) for n in (128, 64, 64)]
        for count in (2, 3):
            out = fused.multi_linear(x, *ws[:count])
            assert torch.equal(out, torch.cat([gpu.linear(x, w) for w in ws[:count]], -1)), (dtype, count)
            for i in (0, 33, 69):
                assert torch.equal(fused.multi_linear(x[i : i + 1], *ws[:count])[0], out[i]), (dtype, i)
    assert not fused.fits(torch.zeros(64, 8), torch.zeros(40, 8))  # 40 rows: not whole column blocks
    # split-K (K = 640 and one column block: two parts of 320; SPLIT_PROGRAMS 1: none): F.linear's
    # values, a row alone equals itself in the batch; and multi_linear splits as `linear` of one
    # weight of all its rows does
    assert gpu.k_splits(64, 640) == (2, 320) and gpu.k_splits(151936, 640) == (1, 640)
    assert gpu.k_splits(1024, 3072) == (8, 384) and gpu.k_splits(1024, 2000) == (7, 320)
    for programs in (128, 1):
        gpu.SPLIT_PROGRAMS = programs
        x, w = torch.randn(70, 640, device=device), torch.randn(64, 640, device=device)
        full = gpu.linear(x, w)
        assert torch.allclose(full, F.linear(x, w), atol=1e-3), (full - F.linear(x, w)).abs().max()
        assert all(torch.equal(gpu.linear(x[i : i + 1], w)[0], full[i]) for i in (0, 40, 69))
        parts = [w, torch.randn(128, 640, device=device)]
        both = fused.multi_linear(x, *parts)
        assert torch.equal(both, gpu.linear(x, torch.cat(parts))), programs
        assert torch.equal(fused.multi_linear(x[5:6], *parts)[0], both[5])
    gpu.SPLIT_PROGRAMS = 128

    def norm_ref(x, w, eps=1e-6):
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    # norm_rope: the per-head norm and RoPE of strided q and k (views of a q|k|v output), with and
    # without the norm; each token's numbers alone equal its numbers in the batch
    b, t, h, hkv, d = 2, 5, 4, 2, 32
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        qkv = torch.randn(b, t, (h + 2 * hkv) * d, device=device).to(dtype)
        q = qkv[..., : h * d].view(b, t, h, d)
        k = qkv[..., h * d : (h + hkv) * d].view(b, t, hkv, d)
        qw, kw = (torch.rand(d, device=device) + 0.5).to(dtype), (torch.rand(d, device=device) + 0.5).to(dtype)
        angles = torch.randn(b, t, d // 2, device=device)
        cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
        for weights in ((qw, kw), (None, None)):
            got_q, got_k = fused.norm_rope(q, k, *weights, cos, sin, 1e-6)
            ref_q, ref_k = (
                apply_rope((x if w is None else norm_ref(x, w)).transpose(1, 2), cos, sin)
                for x, w in ((q, weights[0]), (k, weights[1]))
            )
            assert torch.allclose(got_q.float(), ref_q.float(), atol=tol, rtol=tol), (got_q - ref_q).abs().max()
            assert torch.allclose(got_k.float(), ref_k.float(), atol=tol, rtol=tol), (got_k - ref_k).abs().max()
            one_q, one_k = fused.norm_rope(q[1:, 3:4], k[1:, 3:4], *weights, cos[1:, 3:4], sin[1:, 3:4], 1e-6)
            assert torch.equal(one_q[0, :, 0], got_q[1, :, 3]) and torch.equal(one_k[0, :, 0], got_k[1, :, 3])
    # a decode step's shape ([n, 1, ...] views: the size-1 dimension's stride is not the row's):
    # read in place, the same numbers as from contiguous copies
    qkv = torch.randn(5, 1, (h + 2 * hkv) * d, device=device)
    q, k = qkv[..., : h * d].view(5, 1, h, d), qkv[..., h * d : (h + hkv) * d].view(5, 1, hkv, d)
    assert q.stride(0) != q.shape[1] * q.stride(1)
    qw, kw = torch.rand(d, device=device) + 0.5, torch.rand(d, device=device) + 0.5
    cos, sin = torch.randn(5, 1, d, device=device), torch.randn(5, 1, d, device=device)
    got, want = fused.norm_rope(q, k, qw, kw, cos, sin, 1e-6), fused.norm_rope(q.contiguous(), k.contiguous(), qw, kw, cos, sin, 1e-6)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # add_rms_norm: x + y exactly as PyTorch adds, and the norm; silu_mul
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x, y = torch.randn(3, 7, 96, device=device).to(dtype), torch.randn(3, 7, 96, device=device).to(dtype)
        w = (torch.rand(96, device=device) + 0.5).to(dtype)
        total, normed = fused.add_rms_norm(x, y, w, 1e-6)
        # (the interpreter rounds to bf16 its own way: exact there in fp32 only)
        assert torch.equal(total, x + y) or device == "cpu" and dtype == torch.bfloat16
        assert torch.allclose(total.float(), (x + y).float(), atol=tol, rtol=tol)
        assert torch.allclose(normed.float(), norm_ref(x + y, w).float(), atol=tol, rtol=tol)
        gu = torch.randn(5, 2 * 80, device=device).to(dtype)
        ref = F.silu(gu[:, :80]) * gu[:, 80:]
        assert torch.allclose(fused.silu_mul(gu).float(), ref.float(), atol=tol, rtol=tol)
    # write_kv: a step's keys and values (v strided, as a view of q|k|v) into the cache at each
    # slot's position, as indexed assignment writes them; nothing else moves
    kc, vc = torch.randn(5, 2, 16, 32, device=device), torch.randn(5, 2, 16, 32, device=device)
    want_k, want_v = kc.clone(), vc.clone()
    k = torch.randn(3, 2, 1, 32, device=device)
    v = torch.randn(3, 1, 4 * 32, device=device)[..., 64:].view(3, 1, 2, 32).transpose(1, 2)
    positions = torch.tensor([0, 9, 15], device=device)
    gpu.write_kv(k, v, positions, kc, vc)
    rows = torch.arange(3, device=device)
    want_k[rows, :, positions], want_v[rows, :, positions] = k[:, :, 0], v[:, :, 0]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    # backward: PyTorch's over the model's ops (fp32)
    x = torch.randn(6, 96, device=device, requires_grad=True)
    ws = [torch.randn(n, 96, device=device, requires_grad=True) for n in (128, 64)]
    got = torch.autograd.grad(fused.multi_linear(x, *ws).square().sum(), (x, *ws))
    want = torch.autograd.grad(torch.cat([x @ w.t() for w in ws], -1).square().sum(), (x, *ws))
    assert all(torch.allclose(g, r, atol=1e-3, rtol=1e-4) for g, r in zip(got, want))
    # the whole layer stack: the fused glue against the model's own ops (FUSED_GLUE off), values
    # and gradients; a sequence alone equals itself in a batch, bit for bit
    cfg = ModelConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=64, tie_word_embeddings=True,
    )
    model = invariant.make_invariant(init_model(cfg, seed=1).to(device))
    ids = torch.randint(0, 64, (3, 9), device=device)
    runs = []
    for glue in (True, False):
        invariant.FUSED_GLUE = glue
        model.zero_grad()
        logits = model(ids)
        logits.float().square().mean().backward()
        runs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        if glue:
            assert torch.equal(model(ids[1:2])[0], logits[1]), "a sequence alone"
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-4, rtol=1e-4), (runs[0][0] - runs[1][0]).abs().max()
    for got, want in zip(runs[0][1], runs[1][1]):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-3), (got - want).abs().max()
    print("ok")
    """
)


ENGINE_CHECKS = textwrap.dedent(
    """
    import sys, tempfile
    from pathlib import Path
    sys.path.insert(0, "tests")
    from slipstream.kernels import invariant_gpu as gpu, invariant_fused as fused
    gpu.available = fused.usable = lambda x: True  # the CUDA path, on CPU tensors
    from mesh_fixtures import build_tiny_model
    from test_true_on_policy import _cfg, _mismatch, _rollout
    from slipstream.services.trainer.actor import Actor

    # every projection a whole number of column blocks (fused q|k|v and gate|up), down_proj split
    # in two (K = 512), and the engine's decode shapes: [n, 1] rows, the KV writes in one launch
    model_dir = Path(tempfile.mkdtemp()) / "model"
    build_tiny_model(model_dir, max_position_embeddings=96, hidden_size=128, head_dim=32, intermediate_size=512)
    assert gpu.k_splits(128, 512) == (2, 256)
    worst, n = _mismatch(Actor.from_config(_cfg(model_dir)), _rollout(model_dir, True))
    assert n > 250 and worst == 0.0, (worst, n)
    print("ok")
    """
)


@needs_interpreter
def test_the_engine_decodes_what_the_trainer_computes_through_the_kernels_under_the_interpreter():
    """The engine's sampled log-probs against the trainer's, bit for bit, with every CUDA kernel of the
    mode (fused glue, split-K, KV writes, attention) run by Triton's interpreter on the CPU (fp32):
    what `test_sampler_log_probs_equal_the_trainers_on_the_gpu` checks on a GPU, where one is lent."""
    run_checks(ENGINE_CHECKS, interpret=True)


@needs_interpreter
def test_fused_glue_under_the_interpreter():
    run_checks(FUSED_CHECKS, interpret=True)


@cuda
def test_fused_glue_on_the_gpu():
    run_checks(FUSED_CHECKS, interpret=False)


@pytest.mark.parametrize(
    "counts",
    [[1], [0, 2, 0], [65] * 4, [64, 0, 1, 129, 0], [0] * 120 + [3, 1, 0, 0, 2, 1, 0, 1], list(range(40))],
)
@pytest.mark.parametrize("block_m", [None, 16])
def test_expert_tiles_cover_each_experts_rows_once(counts, block_m):
    """The grouped GEMM's tile table (tensor ops alone: checked without Triton too): each expert's
    rows in tiles of BLOCK_M (or the engine's block_m) from its first row, each tile with its
    expert's end row, in expert order, then spare tiles (end = start), within the grid's upper
    bound; an expert with no rows has no tile."""
    from slipstream.kernels import invariant_gpu as gpu

    tiles = gpu.expert_tiles(torch.tensor(counts, dtype=torch.int32), sum(counts), block_m)
    expected, first = [], 0
    for e, c in enumerate(counts):
        expected += [(e, s, first + c) for s in range(first, first + c, block_m or gpu.BLOCK_M)]
        first += c
    table = list(zip(tiles.expert.tolist(), tiles.start.tolist(), tiles.end.tolist(), strict=True))
    assert table[: len(expected)] == expected
    assert all(start == end for _, start, end in table[len(expected) :])


@needs_interpreter
def test_kernels_under_the_interpreter():
    run_checks(KERNEL_CHECKS, interpret=True)


@cuda
def test_kernels_on_the_gpu():
    run_checks(KERNEL_CHECKS, interpret=False)


@needs_interpreter
def test_grouped_experts_under_the_interpreter():
    run_checks(GROUPED_CHECKS, interpret=True)


@cuda
def test_grouped_experts_on_the_gpu():
    run_checks(GROUPED_CHECKS, interpret=False)


@cuda
@pytest.mark.parametrize("kind", ["dense", "dense-fused", "moe", "moe-graphs"])
def test_sampler_log_probs_equal_the_trainers_on_the_gpu(kind, tmp_path, monkeypatch):
    """bf16 on both sides, the engine over batches that change size every few steps; after an
    optimizer step and a bf16 push too. CUDA graphs: dense, and MoE with `INVARIANT_MOE_GRAPHS` on
    (moe-graphs: the check that the switch waits for)."""
    from test_true_on_policy import MOE, _cfg, _generate

    from mesh_fixtures import build_tiny_model
    from slipstream.models.hf import load_model
    from slipstream.services.rollout.engine import runner
    from slipstream.services.rollout.engine.native import NativeEngine
    from slipstream.services.rollout.engine.request import Request
    from slipstream.services.trainer.actor import Actor

    extra = MOE if kind.startswith("moe") else {}
    monkeypatch.setattr(runner, "INVARIANT_MOE_GRAPHS", kind == "moe-graphs")
    # head_dim 16: a tensor-core dot needs 16 inputs or more
    # dense-fused: every projection a whole number of the fused GEMM's column blocks (q|k|v fused
    # too; at dense's head_dim 16 its k/v projections of 32 rows go one by one)
    wide = dict(hidden_size=128, head_dim=32, intermediate_size=256) if kind == "dense-fused" else {}
    model_dir = build_tiny_model(
        tmp_path / "model",
        max_position_embeddings=160,
        **{"hidden_size": 64, "head_dim": 16, **wide},
        **extra,
    )
    actor = Actor.from_config(_cfg(model_dir, device="cuda", bf16=True, lr=1e-2))
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]

    def rollout(model):
        engine = NativeEngine(model, eos_token_ids=[], max_batch_size=5, true_on_policy=True)
        assert (engine.runner.graphs is not None) == (kind != "moe")
        reqs = [
            Request(f"{i}-{j}", p, 12 + 7 * j, seed=100 * i + j)
            for i, p in enumerate(prompts)
            for j in range(4)
        ]
        return _generate(engine, reqs)

    def mismatch(samples):  # (max |trainer - sampler|, tokens compared)
        with torch.no_grad():
            trainer = actor.log_probs(actor.tensors(samples, [0.0] * len(samples))).cpu()
        worst, n = 0.0, 0
        for row, s in enumerate(samples):
            start = len(s.tokens) - s.response_length - 1
            diff = trainer[row, start : start + s.response_length] - torch.tensor(s.rollout_log_probs)
            worst, n = max(worst, float(diff.abs().max())), n + s.response_length
        return worst, n

    samples = rollout(load_model(model_dir, device="cuda", dtype=torch.bfloat16))
    worst, n = mismatch(samples)
    assert n > 250 and worst == 0.0, (worst, n)
    actor.train_rollout(samples, [1.0, -1.0] * (len(samples) // 2))
    moved = load_model(model_dir, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in moved.named_parameters():  # a bf16 push, as the stager loads it
            p.copy_(dict(actor.model.named_parameters())[name].to(torch.bfloat16))
    worst, n = mismatch(rollout(moved))
    assert worst == 0.0, (worst, n)
