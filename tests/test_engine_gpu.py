"""The GPU engine (preallocated cache, CUDA graphs, fused sampler, FP8) against the CPU path.

Skipped without CUDA (CI has none); run on a GPU machine with `pytest -m gpu tests/test_engine_gpu.py`.
Tolerances: in fp32 the GPU engine gives the CPU engine's greedy tokens exactly and log-probs to
1e-4 (different kernels, same function); in bf16 the engine's log-probs match a full-sequence
forward (what the trainer computes) to a mean absolute difference under 0.02 (bf16 rounding of
cached vs recomputed activations).
"""

import threading

import pytest
import torch

from slipstream.kernels import sampling as fused
from slipstream.kernels.fp8_linear import convert_to_fp8, fp8_matmul, quantize_rows, scaled_mm_supported
from slipstream.models import ModelConfig, init_model
from slipstream.services.rollout.engine import NativeEngine, Request
from slipstream.services.rollout.engine.fused_step import FusedDecoder
from slipstream.services.rollout.engine.kv_cache import KVCache
from slipstream.services.rollout.engine.sampler import SamplingParams, tempered_log_probs
from slipstream.services.rollout.engine.sampler import sample as plain_sample
from tests.test_engine import make_model, prompt, shared_prefix_log_prob_diffs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def requests(temperature: float, max_new: int = 12):
    lengths = [3, 9, 1, 17, 6, 9, 9]
    return [
        Request(
            f"r{i}", prompt(9 if i >= 5 else n, 0 if i >= 5 else i), max_new, temperature=temperature, seed=i
        )
        for i, n in enumerate(lengths)
    ]


def test_greedy_gpu_graphs_match_the_cpu_path():
    reqs = requests(0.0)
    cpu = NativeEngine(make_model(), eos_token_ids=[], max_batch_size=4).generate(reqs)
    engine = NativeEngine(make_model().cuda(), eos_token_ids=[], max_batch_size=4, max_seq_len=64)
    assert engine.graphs is not None and engine.cache.fixed
    gpu = engine.generate(reqs)
    assert engine.graphs.graphs, "decode ran eagerly, not from CUDA graphs"
    for a, b in zip(cpu, gpu, strict=True):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(b.log_probs), torch.tensor(a.log_probs), atol=1e-4, rtol=0)


# One row per family the fused decode must cover: Qwen3's q/k norm; Qwen2's q/k/v biases and no
# q/k norm; Llama without biases, and with both bias switches on (o and MLP biases too). Scaled
# RoPE rides along (its cos/sin are the model's own, so the kernel sees no difference).
FAMILIES = {
    "qwen3": dict(model_type="qwen3"),
    "qwen2": dict(model_type="qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
    "llama": dict(
        model_type="llama",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        | {"original_max_position_embeddings": 16},
    ),
    "llama-biases": dict(model_type="llama", attention_bias=True, mlp_bias=True),
}


def family_model(family: str, config: ModelConfig | None = None, **shape) -> torch.nn.Module:
    """A random model of `family` (biases drawn, not zero: a bias added twice or never must show)."""
    config = config or ModelConfig(**shape, **FAMILIES[family])
    model = init_model(config, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_gpu_graphs_match_the_cpu_path_for_each_family(family):
    shape = dict(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        max_position_embeddings=256,
    )  # fmt: skip

    def model():
        m = family_model(family, **shape)
        m.model.norm.weight.data.mul_(8.0)  # peaked next-token distributions, as make_model's
        return m

    reqs = requests(0.0)
    cpu = NativeEngine(model(), eos_token_ids=[], max_batch_size=4).generate(reqs)
    engine = NativeEngine(model().cuda(), eos_token_ids=[], max_batch_size=4, max_seq_len=64)
    assert engine.fused is not None and engine.graphs is not None
    gpu = engine.generate(reqs)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(b.log_probs), torch.tensor(a.log_probs), atol=1e-4, rtol=0)


def test_sampled_gpu_tokens_match_the_cpu_path():
    """Same seeds, same hashed noise: the fused sampler draws what the CPU sampler draws."""
    reqs = requests(1.0, 20)
    cpu = NativeEngine(make_model(), eos_token_ids=[]).generate(reqs)
    gpu = NativeEngine(make_model().cuda(), eos_token_ids=[], max_seq_len=64).generate(reqs)
    same = sum(a.tokens == b.tokens for a, b in zip(cpu, gpu, strict=True))
    assert same >= len(reqs) - 1  # a last-ulp log() difference may flip one near-tie


def test_bf16_log_probs_agree_with_a_full_forward():
    model = make_model(head_scale=1.0).cuda().to(torch.bfloat16)
    reqs = requests(1.0, 24)
    results = NativeEngine(model, eos_token_ids=[], max_seq_len=64).generate(reqs)
    diffs = []
    for req, res in zip(reqs, results, strict=True):
        with torch.no_grad():  # the trainer's view: one forward over prompt + response
            logits = model(torch.tensor([req.tokens + res.tokens], device="cuda"))[
                0, len(req.tokens) - 1 : -1
            ]
        ref = (logits.float() / req.temperature).log_softmax(-1)
        ref = ref.gather(-1, torch.tensor(res.tokens, device="cuda")[:, None]).squeeze(-1)
        diffs.append((torch.tensor(res.log_probs) - ref.cpu()).abs())
    diffs = torch.cat(diffs)
    assert diffs.mean() < 0.02 and diffs.max() < 0.2


@torch.no_grad()
def test_fused_sampler_matches_the_plain_sampler():
    n, vocab = 512, 151936
    logits = torch.randn(n, vocab, device="cuda") * 3
    params = SamplingParams(
        temperature=torch.where(torch.arange(n, device="cuda") % 5 == 0, 0.0, 0.9),
        top_p=torch.ones(n, device="cuda"),
        top_k=torch.zeros(n, dtype=torch.int64, device="cuda"),
        seeds=torch.randint(0, 1 << 62, (n,), device="cuda"),
        positions=torch.randint(0, 4096, (n,), device="cuda"),
    )
    assert fused.available(logits)
    tokens, log_probs = fused.sample(logits, params.temperature, params.seeds, params.positions)
    ref_tokens, ref_log_probs = plain_sample(logits, params, truncate=True)  # truncate=True: plain path
    assert (tokens == ref_tokens).float().mean() > 0.99
    greedy = params.temperature <= 0
    assert torch.equal(tokens[greedy], ref_tokens[greedy])
    same = tokens == ref_tokens
    torch.testing.assert_close(log_probs[same], ref_log_probs[same], atol=1e-4, rtol=0)
    # the definition in PyTorch (the plain path reports the kernel's own numbers on CUDA)
    exact = tempered_log_probs(logits, params.temperature).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(log_probs, exact, atol=1e-4, rtol=0)


@pytest.mark.skipif(not scaled_mm_supported(torch.device("cuda")), reason="needs FP8 tensor cores")
@torch.no_grad()
def test_scaled_mm_matches_the_fallback():
    x = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    fast = fp8_matmul(xq, xs, wq, ws, torch.float32)
    ref = (xq.float() * xs) @ (wq.float() * ws).t()
    assert float((fast - ref).norm() / ref.norm()) < 5e-3  # bf16 output rounding


def test_fp8_engine_on_gpu_tracks_bf16():
    reqs = requests(0.0)
    bf16 = NativeEngine(make_model().cuda().to(torch.bfloat16), eos_token_ids=[], max_seq_len=64)
    fp8 = NativeEngine(make_model().cuda().to(torch.bfloat16), eos_token_ids=[], max_seq_len=64, fp8=True)
    a, b = bf16.generate(reqs), fp8.generate(reqs)
    # Greedy paths diverge after the first differing token, so compare the first tokens only.
    assert sum(r.tokens[0] == s.tokens[0] for r, s in zip(a, b, strict=True)) >= len(reqs) - 1


@torch.no_grad()
def test_quantize_rows_kernel_matches_the_torch_arithmetic():
    x = (
        torch.randn(77, 3072, device="cuda", dtype=torch.bfloat16)
        * torch.logspace(-2, 2, 77, device="cuda")[:, None]
    )
    q, scale = quantize_rows(x)
    xf = x.float()
    ref_scale = xf.abs().amax(-1, keepdim=True) / 448.0
    torch.testing.assert_close(scale, ref_scale)
    ref_q = (xf / ref_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert (
        q.float() != ref_q.float()
    ).float().mean() < 1e-3  # x/scale may round differently in a rare last bit


@torch.no_grad()
def test_decode_attention_kernel_matches_sdpa():
    from slipstream.kernels.attention import decode_attention

    b, h, hkv, d, cap = 37, 16, 8, 128, 300
    q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b + 3, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b + 3, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(1, cap + 1, (b,), device="cuda")
    mask = (torch.arange(cap, device="cuda")[None, :] < lengths[:, None])[:, None, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k[:b].float(), v[:b].float(), attn_mask=mask, enable_gqa=True
    )
    for splits in (1, 3):
        out = decode_attention(q, k, v, lengths, splits=splits)
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)  # an FP8 cache, widened in the kernel
    ref8 = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k8[:b].float(), v8[:b].float(), attn_mask=mask, enable_gqa=True
    )
    for splits in (1, 3):
        out = decode_attention(q, k8, v8, lengths, splits=splits)
        assert float((out.float() - ref8).norm() / ref8.norm()) < 1e-2


def _decode_once(model: torch.nn.Module, fused: bool) -> torch.Tensor:
    """Prefill six prefixes of different lengths into their slots, then decode one token per slot:
    the final-normed hidden states [6, hidden] from the fused step or the model's own forward."""
    cfg = model.config
    b, cap = 6, 64
    cache = KVCache(cfg.num_hidden_layers, 8, 128, b, cap, torch.bfloat16, torch.device("cuda"))
    cache.preallocate(b, cap)
    ids = torch.randint(
        0, cfg.vocab_size, (b, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1)
    )
    lengths = torch.tensor([1, 40, 17, 9, 33, 2], device="cuda")
    for i in range(b):  # the prefix of each row into its slot, the last token left to decode
        if lengths[i] > 1:
            model.model(ids[i : i + 1, : lengths[i] - 1], attention=cache.prefill(i))
    tokens, positions = ids[torch.arange(b), lengths - 1], lengths - 1
    if fused:
        return FusedDecoder(model)(tokens, positions, cache).float()
    return model.model(tokens[:, None], positions[:, None], cache.decode(positions, cap))[:, -1].float()


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_fused_decode_step_matches_the_model_forward(family):
    """The fused decode forward (q|k|v and gate|up GEMMs, fused glue kernels) against the model's
    own forward over the same cache, bf16, at Qwen3-0.6B's layer shape; FP8 (activations quantized
    inside the fused kernels) is as close to bf16 as the plain FP8 layers are; and the model's
    parameters are views of the fused weights (so weight updates reach the fused GEMMs)."""
    config = ModelConfig(
        vocab_size=512, hidden_size=1024, intermediate_size=3072, num_hidden_layers=3,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=256,
        **FAMILIES[family],
    )  # fmt: skip

    def model():
        return family_model(family, config).cuda().to(torch.bfloat16)

    def fp8_model():
        m = model()
        convert_to_fp8(m)
        return m

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    ref = _decode_once(model(), fused=False)
    m = model()
    assert rel(_decode_once(m, fused=True), ref) < 1e-2
    fused = FusedDecoder(m)
    proj = m.model.layers[1].self_attn.k_proj
    assert proj.weight.untyped_storage().data_ptr() == fused.layers[1][1].weight.untyped_storage().data_ptr()
    if config.qkv_bias:  # Qwen2 and biased Llama: the bias views share the fused bias too
        assert proj.bias.untyped_storage().data_ptr() == fused.layers[1][1].bias.untyped_storage().data_ptr()
    if scaled_mm_supported(torch.device("cuda")):  # every family, Qwen2's q/k/v bias included
        plain_fp8 = _decode_once(fp8_model(), fused=False)
        fused_fp8 = _decode_once(fp8_model(), fused=True)
        e_plain, e_fused = rel(plain_fp8, ref), rel(fused_fp8, ref)
        assert e_fused < 1.5 * e_plain + 1e-2, (e_plain, e_fused, rel(fused_fp8, plain_fp8))


def test_fp8_kv_cache_on_gpu_tracks_the_bf16_cache():
    """The fused step writes e4m3 keys/values and the attention kernel widens them: sampled tokens
    follow the bf16-cache engine's until a near-tie flips, log-probs within the bf16 tolerance."""
    reqs = requests(1.0, 24)
    runs = []
    for kv in ("auto", "fp8_e4m3"):
        model = make_model(head_scale=1.0).cuda().to(torch.bfloat16)
        engine = NativeEngine(model, eos_token_ids=[], max_seq_len=64, kv_cache_dtype=kv)
        assert engine.fused is not None and engine.graphs is not None
        runs.append(engine.generate(reqs))
    diffs = shared_prefix_log_prob_diffs(*runs)
    assert len(diffs) >= len(reqs) * 8
    assert diffs.mean() < 0.02 and diffs.max() < 0.2


def test_cuda_work_on_another_thread_does_not_break_a_graph_capture():
    """The rollout server stages weights on a worker thread (CUDA IPC opens, copies, a header read
    back) while the engine thread may be capturing a new batch bucket. Under CUDA's default global
    capture mode either side's call failed (the H200 run's dead rollout servers); with thread-local
    capture both go on and the graphs give what they give without the other thread."""
    reqs = [Request(f"r{i}", prompt(3 + i % 5, offset=i), 10, temperature=0.0) for i in range(16)]
    sizes = (1, 2, 3, 5, 9, 16)  # a new batch bucket (a capture) for most of them
    alone = NativeEngine(make_model().cuda(), eos_token_ids=[], max_batch_size=16, max_seq_len=64)
    expected = [r.tokens for n in sizes for r in alone.generate(reqs[:n])]

    engine = NativeEngine(make_model().cuda(), eos_token_ids=[], max_batch_size=16, max_seq_len=64)
    stop, errors, reads = threading.Event(), [], [0]

    def stage() -> None:  # what stager.finish does on its thread, as fast as it can
        side = torch.cuda.Stream()
        try:
            while not stop.is_set():
                with torch.cuda.stream(side):
                    blob = torch.arange(1 << 16, device="cuda", dtype=torch.int64)
                    assert blob[:4].tolist() == [0, 1, 2, 3]
                reads[0] += 1
        except Exception as e:  # noqa: BLE001 - the test's verdict
            errors.append(e)

    worker = threading.Thread(target=stage)
    worker.start()
    try:
        got = [r.tokens for n in sizes for r in engine.generate(reqs[:n])]
    finally:
        stop.set()
        worker.join()
    assert not errors, errors[0]
    assert reads[0] > 0 and len(engine.graphs.graphs) >= 4
    assert got == expected
