"""Pallas kernels that fuse 4-bit dequantization into the matmuls of a linear layer.

A weight W [N, K] in bitsandbytes' format, with K a multiple of the blocksize (so no block
crosses a row), is taken as
- packed: uint8 [N, K / 2], byte j of row n holding W[n, 2j] (high nibble) and W[n, 2j + 1]
  (low nibble);
- scales: float32 [N, K / blocksize], each block's absmax (double quantization already undone);
- codebook: float32 [16], the code values (`codebooks.CODES[quant_type]`),
and W[n, k] = codebook[code] * scales[n, k // blocksize] in float32, cast to the compute dtype,
as `formats.dequantize` does. The kernels dequantize one [BLOCK_N, BLOCK_K / 2] tile of codes at
a time, so the float weight never reaches HBM.

The nibbles are never interleaved inside a kernel. With W_hi [N, K / 2] the values of the high
nibbles (even columns of W) and W_lo those of the low nibbles (odd columns):
- `fused_matmul`: x @ W.T = x[:, 0::2] @ W_hi.T + x[:, 1::2] @ W_lo.T;
- `fused_matmul_transposed`: g @ W has even columns g @ W_hi and odd columns g @ W_lo.

Each program of the grid owns one output tile and loops over the contracted dimension itself,
accumulating in float32: programs are independent, as the Triton backend (which runs the grid in
parallel) requires; so a block holds a row tile's whole contracted dimension (x [bm, K / 2] or
g [bm, N]). Code values are looked up by a select tree over the 4 bits with the codebook baked
in as constants, since Mosaic (TPU) has no vector gather.

Tiles: BLOCK_K = 256 columns of W (128 bytes of codes) per step, a multiple of every blocksize up
to 256 (a larger block gives each row one scale per tile), TPU's 128 lanes and a power of two
for Triton; BLOCK_N = 128 rows of W; rows of x in tiles of 16 to BLOCK_M = 64, a power of two
(Triton's dots need at least 16), zero padded.

Compiled on an H200 (JAX 0.11, `benchmarks/gpu_kernels.py`), they agree with dequantize-then-dot
in bfloat16 but run a QLoRA train step 7.4x slower than XLA's own fusion of it, and with float32
inputs a 64-row tile of a 1024-wide x asks for more shared memory than the GPU has; so
`quantized_matmul` uses them only when asked (`impl="pallas"`). Holding the whole contracted
dimension per block is what to change first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jpeft.quant.formats import BLOCKSIZES

BLOCK_M = 64
BLOCK_N = 128
BLOCK_K = 256
_MIN_BLOCK_M = 16


def supports(m: int, n: int, k: int, blocksize: int) -> bool:
    """Whether the kernels take x [m, k] and a weight [n, k] in blocks of `blocksize`.

    Needs a bitsandbytes blocksize dividing K (blocks stay within a row), K a multiple of
    BLOCK_K and N of BLOCK_N; any m >= 1 (rows are padded).
    """
    return (
        m >= 1
        and n > 0
        and k > 0
        and blocksize in BLOCKSIZES
        and k % blocksize == 0
        and k % BLOCK_K == 0
        and n % BLOCK_N == 0
    )


def fused_matmul(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    codebook: np.ndarray,
    blocksize: int,
    *,
    interpret: bool = False,
) -> jax.Array:
    """x [M, K] @ W.T -> [M, N] in x.dtype: the forward of a linear layer on a 4-bit weight.

    packed: uint8 [N, K / 2]; scales: float32 [N, K / blocksize]; codebook: float32 [16], concrete
    (e.g. `codebooks.CODES["nf4"]`), it is compiled into the kernel. W is dequantized to x.dtype
    and the products are summed in float32. `interpret` runs the kernel in Pallas' interpreter.
    """
    m, k = x.shape
    n = packed.shape[0]
    _check(m, n, k, blocksize, packed, scales)
    return _fused_matmul(
        x, packed, scales, table=_table(codebook), blocksize=blocksize, interpret=interpret
    )


def fused_matmul_transposed(
    g: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    codebook: np.ndarray,
    blocksize: int,
    *,
    interpret: bool = False,
) -> jax.Array:
    """g [M, N] @ W -> [M, K] in g.dtype: the input gradient of `fused_matmul`.

    Operands as in `fused_matmul`; W is dequantized to g.dtype, the products summed in float32.
    """
    m, n = g.shape
    k = 2 * packed.shape[1]
    _check(m, n, k, blocksize, packed, scales)
    return _fused_matmul_transposed(
        g, packed, scales, table=_table(codebook), blocksize=blocksize, interpret=interpret
    )


def _check(m: int, n: int, k: int, blocksize: int, packed: jax.Array, scales: jax.Array) -> None:
    expected = {"packed": (n, k // 2), "scales": (n, k // blocksize)}
    for name, array in (("packed", packed), ("scales", scales)):
        if tuple(array.shape) != expected[name]:
            raise ValueError(
                f"{name} has shape {tuple(array.shape)}, expected {expected[name]} for a weight "
                f"[{n}, {k}] in blocks of {blocksize}"
            )
    if not supports(m, n, k, blocksize):
        raise ValueError(
            f"the fused 4-bit kernels do not take a [{m}, {k}] input and a [{n}, {k}] weight in "
            f"blocks of {blocksize}; check `kernels.supports` and use the reference path"
        )


def _table(codebook) -> tuple[float, ...]:
    """The 16 code values as Python floats (exact for float32), to compile into the kernel."""
    if isinstance(codebook, jax.core.Tracer):
        raise TypeError(
            "the codebook is compiled into the kernel and must be concrete; pass the numpy "
            "array `jpeft.quant.codebooks.CODES[quant_type]`, not a traced array"
        )
    values = np.asarray(codebook, np.float32)
    if values.shape != (16,):
        raise ValueError(f"codebook must hold 16 values, got shape {values.shape}")
    return tuple(float(v) for v in values)


def _compiler_params() -> pltriton.CompilerParams | None:
    """Triton on GPU (Pallas would otherwise pick Mosaic GPU, which these kernels do not suit);
    Mosaic's defaults on TPU."""
    return None if jax.default_backend() == "tpu" else pltriton.CompilerParams(num_warps=4)


def _block_m(m: int) -> int:
    """Rows per tile: a power of two from 16 (Triton's least dot size) to BLOCK_M."""
    return min(BLOCK_M, max(_MIN_BLOCK_M, pl.next_power_of_2(m)))


def _pad_rows(a: jax.Array, block_m: int) -> jax.Array:
    return jnp.pad(a, ((0, -a.shape[0] % block_m), (0, 0)))


def _scale_cols(blocksize: int) -> int:
    """Scales per row of one [*, BLOCK_K / 2] tile of codes (1 when a block spans tiles)."""
    return max(1, BLOCK_K // blocksize)


def _lookup(codes: jax.Array, values: tuple[float, ...], bit: int = 3) -> jax.Array:
    """float32 values[codes] for int32 codes in [0, 16): a select tree from the top bit down."""
    if len(values) == 1:
        return np.float32(values[0])
    half = len(values) // 2
    low = _lookup(codes, values[:half], bit - 1)
    high = _lookup(codes, values[half:], bit - 1)
    return jnp.where((codes & (1 << bit)) != 0, high, low)


def _dequantize_tile(packed, scales, table, blocksize, dtype):
    """uint8 codes [rows, BLOCK_K / 2] and float32 scales [rows, _scale_cols] -> (W_hi, W_lo),
    each [rows, BLOCK_K / 2] in `dtype`: code value x scale in float32, then cast."""
    rows, cols = packed.shape
    codes = packed.astype(jnp.int32)
    per_block = min(blocksize // 2, cols)

    def dequantize(nibbles):
        values = _lookup(nibbles, table).reshape(rows, cols // per_block, per_block)
        return (values * scales[:, :, None]).reshape(rows, cols).astype(dtype)

    return dequantize(codes >> 4), dequantize(codes & 0x0F)


def _dot(a: jax.Array, b: jax.Array, b_axis: int) -> jax.Array:
    """float32 a [r, c] . b, contracting a's columns with b's axis `b_axis` (of size c)."""
    dims = (((1,), (b_axis,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _scales_tile(scales_ref, rows, k_tile: jax.Array, blocksize: int) -> jax.Array:
    """The float32 scales [rows, _scale_cols] of K tile `k_tile` (a traced index)."""
    first = lax.div(k_tile * BLOCK_K, blocksize)
    return scales_ref[rows, pl.ds(first, _scale_cols(blocksize))]


def _forward_kernel(x_hi_ref, x_lo_ref, packed_ref, scales_ref, out_ref, *, table, blocksize):
    """One [bm, BLOCK_N] tile of x @ W.T, looping over K in steps of BLOCK_K.

    x_hi_ref, x_lo_ref: [bm, K / 2]; packed_ref: [BLOCK_N, K / 2]; scales_ref: [BLOCK_N,
    K / blocksize]; out_ref: [bm, BLOCK_N].
    """
    half_k = BLOCK_K // 2

    def step(i, acc):
        cols = pl.ds(pl.multiple_of(i * half_k, half_k), half_k)
        scales = _scales_tile(scales_ref, slice(None), i, blocksize)
        w_hi, w_lo = _dequantize_tile(packed_ref[:, cols], scales, table, blocksize, x_hi_ref.dtype)
        return acc + _dot(x_hi_ref[:, cols], w_hi, 1) + _dot(x_lo_ref[:, cols], w_lo, 1)

    steps = 2 * x_hi_ref.shape[1] // BLOCK_K
    acc = lax.fori_loop(0, steps, step, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _transposed_kernel(g_ref, packed_ref, scales_ref, out_hi_ref, out_lo_ref, *, table, blocksize):
    """One [bm, BLOCK_K / 2] tile of g @ W_hi and of g @ W_lo, looping over N in steps of BLOCK_N.

    g_ref: [bm, N]; packed_ref: [N, BLOCK_K / 2]; scales_ref: [N, K / blocksize] (all of them:
    a block of fewer columns breaks Mosaic's (8, 128) block rule); out_hi_ref, out_lo_ref:
    [bm, BLOCK_K / 2].
    """
    k_tile = pl.program_id(1)

    def step(i, accs):
        rows = pl.ds(pl.multiple_of(i * BLOCK_N, BLOCK_N), BLOCK_N)
        g = g_ref[:, rows]
        scales = _scales_tile(scales_ref, rows, k_tile, blocksize)
        w_hi, w_lo = _dequantize_tile(packed_ref[rows, :], scales, table, blocksize, g.dtype)
        acc_hi, acc_lo = accs
        return acc_hi + _dot(g, w_hi, 0), acc_lo + _dot(g, w_lo, 0)

    zeros = jnp.zeros(out_hi_ref.shape, jnp.float32)
    acc_hi, acc_lo = lax.fori_loop(0, g_ref.shape[1] // BLOCK_N, step, (zeros, zeros))
    out_hi_ref[...] = acc_hi.astype(out_hi_ref.dtype)
    out_lo_ref[...] = acc_lo.astype(out_lo_ref.dtype)


@functools.partial(jax.jit, static_argnames=("table", "blocksize", "interpret"))
def _fused_matmul(x, packed, scales, *, table, blocksize, interpret):
    m, k = x.shape
    n = packed.shape[0]
    bm = _block_m(m)
    rows = _pad_rows(x, bm)
    kernel = functools.partial(_forward_kernel, table=table, blocksize=blocksize)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows.shape[0], n), x.dtype),
        grid=(rows.shape[0] // bm, n // BLOCK_N),
        in_specs=[
            pl.BlockSpec((bm, k // 2), lambda i, j: (i, 0)),
            pl.BlockSpec((bm, k // 2), lambda i, j: (i, 0)),
            pl.BlockSpec((BLOCK_N, k // 2), lambda i, j: (j, 0)),
            pl.BlockSpec((BLOCK_N, k // blocksize), lambda i, j: (j, 0)),
        ],
        out_specs=pl.BlockSpec((bm, BLOCK_N), lambda i, j: (i, j)),
        compiler_params=_compiler_params(),
        interpret=interpret,
    )(rows[:, 0::2], rows[:, 1::2], packed, scales)
    return out[:m]


@functools.partial(jax.jit, static_argnames=("table", "blocksize", "interpret"))
def _fused_matmul_transposed(g, packed, scales, *, table, blocksize, interpret):
    m, n = g.shape
    half_k = packed.shape[1]
    bm = _block_m(m)
    rows = _pad_rows(g, bm)
    kernel = functools.partial(_transposed_kernel, table=table, blocksize=blocksize)
    half = jax.ShapeDtypeStruct((rows.shape[0], half_k), g.dtype)
    out_spec = pl.BlockSpec((bm, BLOCK_K // 2), lambda i, j: (i, j))
    out_hi, out_lo = pl.pallas_call(
        kernel,
        out_shape=(half, half),
        grid=(rows.shape[0] // bm, 2 * half_k // BLOCK_K),
        in_specs=[
            pl.BlockSpec((bm, n), lambda i, j: (i, 0)),
            pl.BlockSpec((n, BLOCK_K // 2), lambda i, j: (0, j)),
            pl.BlockSpec((n, scales.shape[1]), lambda i, j: (0, 0)),
        ],
        out_specs=(out_spec, out_spec),
        compiler_params=_compiler_params(),
        interpret=interpret,
    )(rows, packed, scales)
    return jnp.stack([out_hi[:m], out_lo[:m]], axis=-1).reshape(m, 2 * half_k)
