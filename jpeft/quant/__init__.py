"""Quantized weight storage in bitsandbytes' formats (NF4, FP4, double quantization)."""

from jpeft.quant.bnb_state import from_bnb, to_bnb
from jpeft.quant.formats import (
    BLOCKSIZES,
    QUANT_TYPES,
    QuantizedTensor,
    block_absmax,
    dequantize,
    quantize,
)

__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "QuantizedTensor",
    "block_absmax",
    "dequantize",
    "from_bnb",
    "quantize",
    "to_bnb",
]
