"""The grouped-GEMM experts (`kernels/moe.py`) against the model's expert loop, and the engine's
MoE decode in CUDA graphs (GPU tests, marked `gpu`: `pytest -m gpu tests/test_moe_grouped.py`).

On the CPU `torch._grouped_mm` is a loop over the groups, so the function is checked here; on an
H200 it is CUTLASS's grouped GEMM, and the engine's graphed bf16 decode must give the eager
path's greedy tokens and expert records.
"""

import textwrap

import pytest
import torch
from kernel_checks import needs_interpreter, run_checks

from slipstream.kernels.moe import available, grouped_experts, use_grouped_experts
from slipstream.models import ModelConfig, Routing, init_model
from slipstream.models.moe import Experts

torch.set_num_threads(1)
needs_kernel = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
MOE = dict(
    model_type="qwen3_moe", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4,
    moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=256,
)  # fmt: skip


def _experts(dtype=torch.float32, device="cpu", seed=0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    e = Experts(16, 64, 32)
    with torch.no_grad():
        e.gate_up_proj.copy_(0.1 * torch.randn(e.gate_up_proj.shape, generator=g))
        e.down_proj.copy_(0.1 * torch.randn(e.down_proj.shape, generator=g))
    return e.to(device=device, dtype=dtype)


def _routing(n: int, k: int = 4, experts: int = 16, seed: int = 1, skip: tuple[int, ...] = (3, 7)):
    """Distinct ids per token (some experts never chosen), softmax-like weights."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, experts, generator=g)
    scores[:, list(skip)] = -1  # empty groups
    ids = scores.topk(k, dim=-1).indices
    weights = torch.rand(n, k, generator=g).softmax(-1)
    return ids, weights


@needs_kernel
@pytest.mark.parametrize("n", [1, 5, 64])
def test_grouped_experts_equal_the_expert_loop(n):
    e = _experts()
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(n))
    ids, weights = _routing(n)
    want = e(x, ids, weights)
    got = grouped_experts(x, ids, weights, e.gate_up_proj, e.down_proj)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@needs_kernel
def test_grouped_experts_carry_gradients_to_the_experts_and_weights():
    e = _experts()
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    ids, weights = _routing(9)
    weights.requires_grad_(True)
    grouped_experts(x, ids, weights, e.gate_up_proj, e.down_proj).square().sum().backward()
    grads = (e.gate_up_proj.grad.clone(), e.down_proj.grad.clone(), weights.grad.clone())
    e.zero_grad()
    weights.grad = None
    e(x, ids, weights).square().sum().backward()
    for got, want in zip(grads, (e.gate_up_proj.grad, e.down_proj.grad, weights.grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert grads[0][3].abs().max() == 0  # an expert nobody chose gets no gradient


@needs_kernel
def test_a_model_switched_to_grouped_experts_routes_and_computes_alike():
    model = init_model(ModelConfig(**MOE), seed=4)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want_routing = Routing()
        want = model(ids, routing=want_routing)
        assert use_grouped_experts(model) == 2  # layers 0 and 2
        got_routing = Routing()
        got = model(ids, routing=got_routing)
        replayed = model(ids, routing=Routing(replay=want_routing.experts))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(replayed, got, atol=0, rtol=0)
    assert torch.equal(got_routing.stacked(), want_routing.stacked())


TRITON_CHECKS = textwrap.dedent(
    """
    import torch
    from slipstream.kernels import invariant_gpu, moe
    from slipstream.models.moe import Experts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    e = Experts(16, 64, 32)
    with torch.no_grad():
        e.gate_up_proj.copy_(0.1 * torch.randn(e.gate_up_proj.shape, generator=g))
        e.down_proj.copy_(0.1 * torch.randn(e.down_proj.shape, generator=g))
    e = e.to(device)
    for n in (1, 5, 70):
        x = torch.randn(n, 64, generator=g).to(device)
        scores = torch.rand(n, 16, generator=g)
        scores[:, [3, 7]] = -1  # experts nobody chose
        ids = scores.topk(4, dim=-1).indices.to(device)
        weights = torch.rand(n, 4, generator=g).softmax(-1).to(device)
        want = e(x, ids, weights)
        for blocks in ((64, 64, 64, 4), (16, 128, 64, 4), (32, 32, 128, 4)):
            moe.TRITON_BLOCKS = invariant_gpu.Blocks(*blocks)
            got = moe.grouped_experts(x, ids, weights, e.gate_up_proj, e.down_proj, "triton")
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (n, blocks, (got - want).abs().max())
    print("ok")
    """
)


@needs_interpreter
def test_triton_grouped_experts_under_the_interpreter():
    """The engine's experts on CUDA (`kernel="triton"`, at several tilings) against the expert loop,
    fp32, under Triton's interpreter (a subprocess; skipped without Triton)."""
    run_checks(TRITON_CHECKS, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_grouped_experts_on_the_gpu():
    run_checks(TRITON_CHECKS, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_experts_on_the_gpu_bf16():
    if not available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("grouped GEMM needs a Hopper GPU")
    e = _experts(torch.bfloat16, "cuda")
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    ids, weights = _routing(256)
    ids, weights = ids.cuda(), weights.cuda().bfloat16()
    want = _experts(torch.float32, "cuda")(x.float(), ids, weights.float())
    got = grouped_experts(x, ids, weights, e.gate_up_proj, e.down_proj)
    assert (got.float() - want).abs().max() < 2e-2 * want.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_moe_decode_in_cuda_graphs_equals_eager():
    """bf16 on the GPU: the graphed grouped-GEMM decode replays the eager grouped-GEMM decode bit
    for bit (tokens, log-probs, expert records, prompt positions included), greedy and sampled,
    at a full bucket and a padded one; against the model's own expert loop it differs only by
    bf16 rounding (a different summation order), so a near-tie may flip a sequence there."""
    from slipstream.services.rollout.engine import NativeEngine, Request

    if not available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("grouped GEMM needs a Hopper GPU")
    prompts = [[(7 * j + 5 * i + 1) % 96 for j in range(n)] for i, n in enumerate([20, 3, 27, 9, 14])]

    def run(graphs: bool, loop: bool = False, temperature: float = 0.0, batch: int = 8):
        model = init_model(ModelConfig(**MOE), seed=4).to("cuda", torch.bfloat16)
        engine = NativeEngine(
            model, eos_token_ids=[], max_batch_size=batch, max_seq_len=64, cuda_graphs=graphs
        )
        if loop:  # the reference: the model's own expert loop
            for m in model.modules():
                if isinstance(m, Experts):
                    m.forward = Experts.forward.__get__(m)
        reqs = [Request(f"r{i}", p, 16, temperature=temperature, seed=i) for i, p in enumerate(prompts)]
        results = engine.generate(reqs)
        if graphs:
            assert engine.graphs is not None and engine.graphs.graphs  # decode ran in graphs
        return results

    for temperature, batch in ((0.0, 8), (1.0, 8), (0.0, 1)):
        graphed, eager = (
            run(True, temperature=temperature, batch=batch),
            run(False, temperature=temperature, batch=batch),
        )
        for a, b in zip(graphed, eager, strict=True):
            assert a.tokens == b.tokens and a.log_probs == b.log_probs, (temperature, batch)
            assert torch.equal(a.routed_experts, b.routed_experts)
    # Against the expert loop: the same function up to bf16 rounding, which can flip a near-tie in
    # a token or a router's top-k (measured on the H200: 4 of 5 sequences' tokens equal, 94% of
    # their positions with every layer's experts equal, 98% of the expert ids).
    loop = run(False, loop=True)
    graphed = run(True)
    assert sum(a.tokens == b.tokens for a, b in zip(graphed, loop, strict=True)) >= 4
    for a, b in zip(graphed, loop, strict=True):
        if a.tokens == b.tokens:
            agree = (a.routed_experts == b.routed_experts).float().mean()
            assert agree > 0.9, agree


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_moe_with_fp8_projections_graphs_and_takes_fp8_versions():
    """--rollout-fp8 on an MoE on the GPU: FP8 attention / dense-MLP projections, bf16 grouped
    experts; the graphed decode equals the eager one, and an FP8 version (packed on the GPU, staged
    keeping the projections' blocks) loads with its experts dequantized expert by expert."""
    from slipstream.quant import dequantize_blockwise, quantize_blockwise
    from slipstream.services.rollout.engine import NativeEngine, Request
    from slipstream.weights import WeightStager, iter_messages, pack, weights_to_sync

    if not available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("grouped GEMM needs a Hopper GPU")
    prompts = [[(7 * j + 5 * i + 1) % 96 for j in range(n)] for i, n in enumerate([20, 3, 27, 9, 14])]
    reqs = [Request(f"r{i}", p, 16, temperature=0.0, seed=i) for i, p in enumerate(prompts)]
    engines = {}
    for graphs in (True, False):
        model = init_model(ModelConfig(**MOE), seed=4).to("cuda", torch.bfloat16)
        engines[graphs] = NativeEngine(
            model, eos_token_ids=[], max_batch_size=8, max_seq_len=64, cuda_graphs=graphs, fp8=True
        )
    assert engines[True].runner.fp8_layers and not any(
        ".experts." in n for n in engines[True].runner.fp8_layers
    )
    graphed, eager = engines[True].generate(reqs), engines[False].generate(reqs)
    for a, b in zip(graphed, eager, strict=True):
        assert a.tokens == b.tokens and torch.equal(a.routed_experts, b.routed_experts)

    source = init_model(ModelConfig(**MOE), seed=5).to("cuda", torch.bfloat16)
    weights = weights_to_sync(source.state_dict(), source.config.tie_word_embeddings)
    manifest, chunks = pack(weights, 1, "fp8")
    shapes = {n: tuple(t.shape) for n, t in weights.items()}
    stager = WeightStager(shapes, 0, device="cuda", dtype=torch.bfloat16, keep_fp8=True)
    for msg in iter_messages(manifest, chunks):
        stager.add(msg)
    engine = engines[True]
    engine.load_weights(*reversed(stager.finish()))
    served = dict(engine.model.named_parameters())
    for name, w in weights.items():
        if ".mlp.experts." in name:
            want = torch.stack(
                [dequantize_blockwise(*quantize_blockwise(m.cpu()), torch.bfloat16) for m in w]
            )
            assert torch.equal(served[name].cpu(), want), name
    assert all(len(r.tokens) == 16 for r in engine.generate(reqs))
