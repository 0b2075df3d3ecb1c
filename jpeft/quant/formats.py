"""bitsandbytes' 4-bit weight formats (NF4, FP4, optional double quantization) in jnp.

A weight W of n elements is flattened row-major and cut into blocks of `blocksize`; the last block
may be partial. Each block keeps its absmax (float32) and, per element, the 4-bit code nearest to
x / absmax. Two codes share a byte, the first element in the high nibble. With double
quantization the absmax values are stored as uint8 codes of the 8-bit dynamic map: their mean
(`offset`) is subtracted, and the deviations are quantized in blocks of 256 with their own
float32 absmax (`nested_absmax`).

`quantize` reproduces the bytes of `bitsandbytes.functional.quantize_4bit` on CPU (0.50), and
`dequantize` the values of `dequantize_4bit`. Two limits, both from the platforms: XLA flushes
subnormal floats to zero, so a block whose absmax or its reciprocal is subnormal (weights under
1.2e-38 or over 8.5e37 in magnitude) comes out otherwise; and the double-quantization offset
follows one torch thread's summation order (see `torch_sum`), which a multi-threaded torch may
leave for layers of 32768 blocks or more.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jpeft.quant import codebooks
from jpeft.quant.torch_sum import torch_cpu_mean

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
NESTED_BLOCKSIZE = 256
_MIN_PARTIAL_ABSMAX = np.float32(1e-38)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["packed", "absmax", "nested_absmax", "nested_code", "offset"],
    meta_fields=["quant_type", "blocksize", "weight_shape", "dtype", "nested_blocksize"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A 4-bit weight as a pytree; the arrays are leaves, the format is static.

    packed: uint8 [(n + 1) // 2], flat (bitsandbytes saves it as [(n + 1) // 2, 1]); element 2i
        in the high nibble of byte i, element 2i + 1 in the low one (code 7 for NF4 and code 0
        for FP4 pad an odd n).
    absmax: float32 [blocks], or uint8 [blocks] codes into `nested_code` with double quantization.
    nested_absmax: float32 [ceil(blocks / nested_blocksize)], or None without double quantization.
    nested_code: float32 [256], the map that `absmax` codes index, or None.
    offset: float32 [], added back to the dequantized absmax, or None.
    quant_type: "nf4" or "fp4". blocksize: elements per block.
    weight_shape: the shape of one quantized weight (n elements).
    dtype: the weight's dtype name ("float32", "bfloat16" or "float16").

    Weights quantized one by one can be stacked (`stack`): every array leaf then has the same
    leading axes (e.g. [layers]), `shape` is those axes + `weight_shape`, as for an array, and
    `lax.scan` over the stack hands each step one weight.
    """

    packed: jax.Array
    absmax: jax.Array
    quant_type: str
    blocksize: int
    weight_shape: tuple[int, ...]
    dtype: str
    nested_absmax: jax.Array | None = None
    nested_code: jax.Array | None = None
    offset: jax.Array | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The leading axes of a stack of weights; () for one weight."""
        return tuple(self.packed.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """`stack_shape + weight_shape`: the shape of the float weight(s) it stands for."""
        return self.stack_shape + tuple(self.weight_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def weight_size(self) -> int:
        """Elements in one weight."""
        return math.prod(self.weight_shape)

    @property
    def num_blocks(self) -> int:
        """Blocks in one weight."""
        return -(-self.weight_size // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes of all array leaves."""
        return sum(leaf.nbytes for leaf in jax.tree.leaves(self))


def check_format(quant_type: str, blocksize: int) -> None:
    """Raise ValueError unless bitsandbytes supports this 4-bit type and blocksize."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(
            f"blocksize {blocksize!r} is not supported by bitsandbytes; use one of {BLOCKSIZES}"
        )


def quantize(
    w: jax.Array,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    *,
    name: str = "weight",
) -> QuantizedTensor:
    """Quantize `w` (any shape; float32, bfloat16 or float16) to bitsandbytes' 4-bit format.

    Gives the bytes of `bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    quant_type=quant_type, compress_statistics=double_quant)`. Works under `jax.jit`. A concrete
    `w` holding NaN or inf, which no block scale can represent, raises ValueError naming it
    (`name`: the tensor's name for the message).
    """
    check_format(quant_type, blocksize)
    dtype = np.dtype(getattr(w, "dtype", None))
    if dtype.name not in FLOAT_DTYPES:
        raise ValueError(
            f"bitsandbytes 4-bit quantization takes {', '.join(FLOAT_DTYPES)} weights, "
            f"got {dtype.name}; cast the weight first"
        )
    shape = tuple(np.shape(w))
    if math.prod(shape) == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {shape}")
    # A numpy weight goes to the device once, as the jitted function's argument.
    arrays, non_finite = _quantize(w.reshape(-1), quant_type, blocksize, double_quant)
    if not isinstance(non_finite, jax.core.Tracer) and non_finite:
        raise ValueError(
            f"cannot quantize {name}: {int(non_finite)} of its {math.prod(shape)} values are NaN "
            "or inf, which 4-bit blocks cannot hold; fix the weight first"
        )
    return QuantizedTensor(
        quant_type=quant_type, blocksize=blocksize, weight_shape=shape, dtype=dtype.name, **arrays
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(
    flat: jax.Array, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[dict[str, jax.Array], jax.Array]:
    """The arrays of a `QuantizedTensor` for `flat` [n], and how many of its values are not
    finite (int32 [])."""
    codes, absmax = _quantize_4bit(flat.astype(jnp.float32), quant_type, blocksize)
    arrays = {"packed": (codes[0::2] << 4) | codes[1::2], "absmax": absmax}
    if double_quant:
        arrays.update(_quantize_absmax(absmax))
    return arrays, jnp.sum(~jnp.isfinite(flat), dtype=jnp.int32)


def _blocks(x: jax.Array, blocksize: int) -> jax.Array:
    """[n] -> [ceil(n / blocksize), blocksize], zero padded."""
    rows = -(-x.shape[0] // blocksize)
    return jnp.pad(x, (0, rows * blocksize - x.shape[0])).reshape(rows, blocksize)


def _quantize_4bit(flat: jax.Array, quant_type: str, blocksize: int):
    """float32 [n] -> (uint8 codes [2 * ceil(n / 2)], float32 absmax [blocks])."""
    n = flat.shape[0]
    blocks = _blocks(flat, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    nonzero = absmax > 0
    safe = jnp.where(nonzero, absmax, 1.0)
    # bitsandbytes scales full blocks by a rounded reciprocal of absmax and divides the partial
    # last block, whose stored absmax is at least 1e-38; an all-zero block scales to zeros.
    scaled = blocks * jnp.where(nonzero, 1.0 / safe, 0.0)[:, None]
    if n % blocksize:
        # XLA would turn a division by a broadcast scalar into a product with its reciprocal.
        divisor = lax.optimization_barrier(jnp.broadcast_to(safe[-1], blocks[-1].shape))
        scaled = scaled.at[-1].set(blocks[-1] / divisor)
        absmax = absmax.at[-1].set(jnp.where(nonzero[-1], absmax[-1], _MIN_PARTIAL_ABSMAX))
    scaled = scaled.reshape(-1)[: n + n % 2]
    bounds, order = codebooks.bucket_bounds(quant_type)
    bucket = jnp.searchsorted(jnp.asarray(bounds), scaled, side="left", method="compare_all")
    return jnp.asarray(order)[bucket], absmax


def _quantize_absmax(absmax: jax.Array) -> dict[str, jax.Array]:
    """Double quantization: absmax [blocks] -> uint8 codes, nested absmax, offset, code map.

    The deviations from the mean are scaled per block of 256 by the rounded reciprocal of the
    block's absolute maximum and coded by bitsandbytes' CPU rule (`codebooks.dynamic_thresholds`);
    a block of zero deviations, where bitsandbytes computes 0 / 0, gets code 0.
    """
    offset = torch_cpu_mean(absmax)
    deviations = _blocks(absmax - offset, NESTED_BLOCKSIZE)
    nested_absmax = jnp.max(jnp.abs(deviations), axis=1)
    inverse = 1.0 / jnp.where(nested_absmax > 0, nested_absmax, 1.0)
    scaled = (deviations * inverse[:, None]).reshape(-1)[: absmax.shape[0]]
    thresholds = jnp.asarray(codebooks.dynamic_thresholds())
    codes = jnp.searchsorted(thresholds, scaled, side="right", method="compare_all")
    codes = codes.astype(jnp.uint8)
    is_zero_block = jnp.repeat(nested_absmax == 0, NESTED_BLOCKSIZE)[: absmax.shape[0]]
    return {
        "absmax": jnp.where(is_zero_block, jnp.uint8(0), codes),
        "nested_absmax": nested_absmax,
        "nested_code": jnp.asarray(codebooks.dynamic_map()),
        "offset": offset,
    }


def block_absmax(q: QuantizedTensor) -> jax.Array:
    """float32 [*stack_shape, blocks]: each block's scale, undoing double quantization."""
    if q.stack_shape:
        return _per_weight(block_absmax, q)
    if not q.double_quant:
        return q.absmax
    scales = jnp.repeat(q.nested_absmax, q.nested_blocksize)[: q.absmax.shape[0]]
    product = q.nested_code[q.absmax.astype(jnp.int32)] * scales
    # XLA fuses a product feeding a sum into one fused multiply-add, rounded once; bitsandbytes
    # rounds the product first. A select between the two keeps them apart.
    product = jnp.where(product == product, product, 0.0)
    return product + q.offset


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(q: QuantizedTensor, dtype: jax.typing.DTypeLike | None = None) -> jax.Array:
    """The weight [*q.shape] in `dtype` (default: the original dtype): code value x block absmax
    in float32, then cast, as `bitsandbytes.functional.dequantize_4bit`. A stack is
    dequantized weight by weight."""
    if q.stack_shape:
        return _per_weight(functools.partial(dequantize, dtype=dtype), q)
    n = q.weight_size
    codes = jnp.stack([q.packed >> 4, q.packed & 0x0F], axis=-1).reshape(-1)[:n]
    values = jnp.asarray(codebooks.CODES[q.quant_type])[codes.astype(jnp.int32)]
    scaled = _blocks(values, q.blocksize) * block_absmax(q)[:, None]
    out_dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    return scaled.reshape(-1)[:n].astype(out_dtype).reshape(q.weight_shape)


def _per_weight(fn, q: QuantizedTensor) -> jax.Array:
    """`fn` mapped over the stack axes of `q`."""
    for _ in q.stack_shape:
        fn = jax.vmap(fn)
    return fn(q)


def stack(weights: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """Stack weights of one format and shape on a new leading axis (e.g. the layers of a model)."""
    formats = {
        (w.quant_type, w.blocksize, w.weight_shape, w.dtype, w.double_quant) for w in weights
    }
    if len(formats) != 1:
        raise ValueError(
            f"can only stack quantized weights of one format and shape, got {sorted(formats)}"
        )
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *weights)


def unstack(q: QuantizedTensor) -> list[QuantizedTensor]:
    """The weights of a stack with one leading axis, in order."""
    if len(q.stack_shape) != 1:
        raise ValueError(f"unstack takes a stack with one leading axis, got {q.stack_shape}")
    return [jax.tree.map(lambda leaf, i=i: leaf[i], q) for i in range(q.stack_shape[0])]
