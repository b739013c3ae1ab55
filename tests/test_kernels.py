"""The optional fast paths against their plain-PyTorch definitions (CPU here; tests/test_engine_gpu.py
runs the CUDA kernels against the same references)."""

import torch
from torch import nn

from slipstream.kernels.fp8_linear import Fp8Linear, convert_to_fp8, fp8_matmul, quantize_rows
from slipstream.models import Qwen3Config, init_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_quantize_rows_error_bound_and_zero_rows():
    x = torch.randn(64, 256) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different ranges
    x[5] = 0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = q.float() * scale
    amax = x.abs().amax(-1, keepdim=True)
    # e4m3: at most 2^-4 relative for normal values, 2^-10 * scale below; both under amax / 8.
    assert ((back - x).abs() <= amax / 8 + 1e-30).all()
    assert (back[5] == 0).all() and torch.isfinite(back).all()
    assert rel(back, x) < 0.04


def test_fp8_matmul_is_the_dequantized_product():
    x, w = torch.randn(7, 96), torch.randn(48, 96)
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    expected = (xq.float() * xs) @ (wq.float() * ws).t()
    torch.testing.assert_close(fp8_matmul(xq, xs, wq, ws, torch.float32), expected)
    assert rel(expected, x @ w.t()) < 0.08


def test_fp8_linear_tracks_the_linear_it_replaces():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(3, 5, 128)
    assert layer(x).shape == (3, 5, 64)
    assert rel(layer(x), linear(x)) < 0.08


def test_convert_to_fp8_swaps_exactly_the_projections():
    config = Qwen3Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    model = init_model(config)
    swapped = convert_to_fp8(model)
    assert len(swapped) == 14 and "model.layers.1.mlp.down_proj.weight" in swapped
    assert isinstance(model.lm_head, nn.Linear) and isinstance(
        model.model.layers[0].self_attn.q_proj, Fp8Linear
    )
    # The state dict keeps the checkpoint's names and shapes (weight updates are checked against them).
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == {
        n: tuple(t.shape) for n, t in init_model(config).state_dict().items()
    }


def test_fp8_linear_keeps_the_bias():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    with torch.no_grad():
        linear.bias.copy_(torch.randn(64) * 3)  # large next to x @ w.T: a dropped bias must show
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(3, 5, 128)
    assert rel(layer(x), linear(x)) < 0.08
    unbiased = layer(x) - layer.bias
    assert rel(unbiased, linear(x)) > 0.5


def test_fp8_qwen2_keeps_its_qkv_biases_and_updates_them():
    """Qwen2's q/k/v biases survive FP8 conversion under their own names, and an engine weight
    update copies into them (as the rollout server's does)."""
    from services.rollout.engine.native import NativeEngine
    from slipstream.models import ModelConfig

    config = ModelConfig(
        model_type="qwen2", vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = init_model(config, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape))
    reference = init_model(config, seed=0)
    reference.load_state_dict(model.state_dict())
    engine = NativeEngine(model, eos_token_ids=[], max_batch_size=2, fp8=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Fp8Linear)
    tokens = torch.arange(1, 9)[None]
    assert rel(model(tokens), reference(tokens)) < 0.08
    name = "model.layers.1.self_attn.k_proj.bias"
    new_bias = torch.randn(model.model.layers[1].self_attn.k_proj.bias.shape)
    engine.load_weights({name: new_bias}, version=1)
    torch.testing.assert_close(model.model.layers[1].self_attn.k_proj.bias.data, new_bias)
