"""Weight quantization: FP8 e4m3 with 128x128 block scales (DeepSeek-V3 layout)."""

from slipstream.quant.fp8 import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_blockwise,
    quantize_blockwise,
    scale_shape,
    should_quantize,
)

__all__ = [
    "BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "dequantize_blockwise",
    "quantize_blockwise",
    "scale_shape",
    "should_quantize",
]
