"""Quantized weight storage in bitsandbytes' formats (NF4, FP4, double quantization), the
matmul on it, and quantizing a model's params."""

from jpeft.quant.bnb_state import from_bnb, to_bnb
from jpeft.quant.formats import (
    BLOCKSIZES,
    QUANT_TYPES,
    QuantizedTensor,
    block_absmax,
    dequantize,
    quantize,
    stack,
    unstack,
)
from jpeft.quant.matmul import default_compute_dtype, quantized_matmul
from jpeft.quant.params import QuantConfig, dequantize_params, quantize_params

__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "QuantConfig",
    "QuantizedTensor",
    "block_absmax",
    "default_compute_dtype",
    "dequantize",
    "dequantize_params",
    "from_bnb",
    "quantize",
    "quantize_params",
    "quantized_matmul",
    "stack",
    "to_bnb",
    "unstack",
]
