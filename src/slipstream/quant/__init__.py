"""Weight quantization: FP8 e4m3 with 128x128 block scales (DeepSeek-V3 layout), and group-wise
symmetric int4 with one scale per 128 inputs (W4A16; `int4.py` has the layout)."""

from slipstream.quant.fp8 import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    as_block_matrix,
    block_matrix_shape,
    dequantize_blockwise,
    fake_quantize_blockwise,
    quantize_blockwise,
    round_fp8_weights_,
    scale_shape,
    should_quantize,
)
from slipstream.quant.int4 import (
    GROUP,
    dequantize_int4,
    fake_quantize_int4,
    int4_names,
    packed_shapes,
    quantize_int4,
)

__all__ = [
    "BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "GROUP",
    "as_block_matrix",
    "block_matrix_shape",
    "dequantize_blockwise",
    "dequantize_int4",
    "fake_quantize_blockwise",
    "fake_quantize_int4",
    "int4_names",
    "packed_shapes",
    "quantize_blockwise",
    "quantize_int4",
    "round_fp8_weights_",
    "scale_shape",
    "should_quantize",
]
