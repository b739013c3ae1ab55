"""FP8 block quantization: error bounds, partial edge blocks, zero blocks, round-trip types.

The bound pinned here (see slipstream.quant.fp8's docstring): with s = amax / 448 per block,
every weight is reproduced within max(2^-4 * |x|, 2^-10 * s) (half an e4m3 step, normal or
subnormal), hence within 2^-3 * amax of its block: e4m3's relative step.
"""

import pytest
import torch

from slipstream.quant import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    as_block_matrix,
    dequantize_blockwise,
    quantize_blockwise,
    scale_shape,
    should_quantize,
)

torch.set_num_threads(1)


def _blockwise_amax(w: torch.Tensor) -> torch.Tensor:
    """amax of the block each element belongs to, broadcast back to [out, in] (test reference)."""
    amax = torch.empty_like(w)
    for i in range(0, w.shape[0], BLOCK):
        for j in range(0, w.shape[1], BLOCK):
            amax[i : i + BLOCK, j : j + BLOCK] = w[i : i + BLOCK, j : j + BLOCK].abs().max()
    return amax


@pytest.mark.parametrize("shape", [(256, 384), (300, 70), (1, 1), (129, 257), (64, 128)])
def test_error_within_e4m3_bound(shape):
    g = torch.Generator().manual_seed(0)
    # Heavy-tailed weights: outliers make small values fall into the subnormal range.
    w = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    q, scale_inv = quantize_blockwise(w)
    back = dequantize_blockwise(q, scale_inv)
    err = (back - w).abs()

    amax = _blockwise_amax(w)
    s = amax / FP8_MAX
    # Per element: half a step, normal (relative 2^-4) or subnormal (absolute 2^-10 * s); the
    # 1e-6 relative slack covers fp32 rounding of the division and multiplication.
    per_element = torch.maximum(w.abs() * 2**-4, s * 2**-10) * (1 + 1e-6)
    assert (err <= per_element).all(), (err - per_element).max()
    # Per block: within e4m3's relative step of the block's largest magnitude.
    assert (err <= amax * 2**-3).all()
    # And the top of each block is hit exactly (amax maps onto 448, a representable value).
    assert torch.equal(back.abs().amax(), w.abs().amax())


def test_shapes_and_dtypes_with_partial_edge_blocks():
    w = torch.randn(300, 70, dtype=torch.bfloat16)
    q, scale_inv = quantize_blockwise(w)
    assert q.dtype == FP8_DTYPE and q.shape == (300, 70) and q.is_contiguous()
    # ceil(300/128) = 3 row blocks, ceil(70/128) = 1 column block
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 1) == scale_shape(w.shape)
    back = dequantize_blockwise(q, scale_inv, dtype=torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.shape == w.shape
    # The edge block's scale comes from its own 44 rows only, not from the zero padding.
    assert scale_inv[2, 0] == w[256:].float().abs().max() / FP8_MAX


def test_zero_blocks_get_a_safe_scale():
    w = torch.zeros(256, 256)
    w[:128, :128] = torch.randn(128, 128)  # one live block, three all-zero blocks
    q, scale_inv = quantize_blockwise(w)
    assert torch.isfinite(scale_inv).all() and (scale_inv > 0).all()
    back = dequantize_blockwise(q, scale_inv)
    assert not torch.isnan(back).any()
    assert torch.equal(back[128:], torch.zeros(128, 256))
    assert torch.equal(back[:128, 128:], torch.zeros(128, 128))


def test_one_outlier_only_hurts_its_own_block():
    w = torch.full((128, 256), 0.01)
    w[0, 0] = 1000.0  # crushes block (0, 0); block (0, 1) must stay exact-ish
    q, scale_inv = quantize_blockwise(w)
    back = dequantize_blockwise(q, scale_inv)
    assert torch.allclose(back[:, 128:], w[:, 128:], rtol=2**-4)


def test_dequantize_refuses_mismatched_scales():
    q, scale_inv = quantize_blockwise(torch.randn(200, 200))
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_blockwise(q, scale_inv[:1])


def test_should_quantize_only_linear_projections():
    m = torch.zeros(8, 8)
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.3.mlp.experts.7.down_proj.weight",
    ]:
        assert should_quantize(name, m), name
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.3.mlp.gate.weight",  # MoE router
        "model.layers.0.self_attn.q_proj.bias",
    ]:
        assert not should_quantize(name, m), name
    assert not should_quantize("model.layers.0.self_attn.q_proj.weight", torch.zeros(8))
    assert not should_quantize("model.layers.0.mlp.up_proj.weight", torch.zeros(8, 8, dtype=torch.int64))


# ---- stacked MoE experts [E, out, in] ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 256, 128), (4, 200, 130), (2, 96, 300)])  # whole and partial blocks
def test_stacked_experts_are_each_expert_quantized_alone(shape):
    """3-D quantize/dequantize equal the 2-D functions applied expert by expert, bit for bit: no
    block straddles two experts, also where out or in is not a multiple of 128."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 0.02
    w[1, :5] *= 300  # an outlier in one expert must not touch another's scales
    q, scale_inv = quantize_blockwise(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == scale_shape(w.shape)
    assert scale_shape(w.shape) == (shape[0], -(-shape[1] // BLOCK), -(-shape[2] // BLOCK))
    for dtype in (torch.float32, torch.bfloat16):
        back = dequantize_blockwise(q, scale_inv, dtype)
        for e in range(shape[0]):
            qe, se = quantize_blockwise(w[e])
            assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)), e
            assert torch.equal(scale_inv[e], se), e
            assert torch.equal(back[e], dequantize_blockwise(qe, se, dtype)), e


def test_should_quantize_takes_the_stacked_experts_and_leaves_the_router():
    e = torch.zeros(4, 256, 128)
    assert should_quantize("model.layers.0.mlp.experts.gate_up_proj", e)
    assert should_quantize("model.layers.0.mlp.experts.down_proj", e)
    assert not should_quantize(
        "model.layers.0.mlp.experts.down_proj", torch.zeros(4, 8, 8, dtype=torch.int64)
    )
    assert not should_quantize("model.layers.0.mlp.gate.weight", torch.zeros(4, 128))  # router
    assert not should_quantize("model.layers.0.self_attn.q_proj.weight", e)  # a 3-D non-expert
    assert not should_quantize("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(4, 2, 8, 8))
    with pytest.raises(ValueError, match="stacked experts"):
        quantize_blockwise(torch.zeros(2, 2, 8, 8))


def test_stacked_experts_as_one_matrix_are_the_same_blocks():
    """What the GPU paths launch (`as_block_matrix`): [E, out, in] with out a multiple of 128 as one
    [E*out, in] matrix has exactly the per-expert blocks, values and scales; with any other out it
    is not offered (its blocks would straddle experts) and each expert goes alone."""
    w = torch.randn(3, 256, 200, generator=torch.Generator().manual_seed(4))
    flat = as_block_matrix(w)
    assert flat.shape == (3 * 256, 200)
    q, scale_inv = quantize_blockwise(flat)
    q3, scale_inv3 = quantize_blockwise(w)
    assert torch.equal(q.view(w.shape).view(torch.uint8), q3.view(torch.uint8))
    assert torch.equal(scale_inv.view(scale_shape(w.shape)), scale_inv3)
    assert torch.equal(dequantize_blockwise(q, scale_inv).view(w.shape), dequantize_blockwise(q3, scale_inv3))
    assert as_block_matrix(torch.zeros(3, 200, 128)) is None
    m = torch.zeros(5, 7)
    assert as_block_matrix(m) is m


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(4, 256, 384), (3, 200, 130)])  # one [E*out, in] launch; one per expert
def test_stacked_experts_on_the_gpu_equal_the_pytorch_definition(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    w[1, :7] *= 300
    w[2, :128, :128] = 0  # an all-zero block
    q, scale_inv = quantize_blockwise(w)
    rq, rs = quantize_blockwise(w.cpu())  # the PyTorch definition
    assert q.is_cuda and torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(scale_inv.cpu(), rs)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(
            dequantize_blockwise(q, scale_inv, dtype).cpu(), dequantize_blockwise(rq, rs, dtype)
        )
