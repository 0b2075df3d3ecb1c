"""The fused 4-bit Pallas kernels against dequantize-then-dot: compiled on a GPU, in Pallas'
interpreter elsewhere (CPU; Mosaic on TPU has not compiled them yet)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import quant
from jpeft.quant import codebooks, kernels

F32, BF16 = jnp.float32, jnp.bfloat16
INTERPRET = jax.default_backend() != "gpu"
# (quant_type, blocksize, double_quant, m, n, k, dtype). m = 5 and 80 pad the rows to a tile;
# n = 256 has two N tiles; k = 512 and 768 take two and three K tiles; blocksize 512 spans K tiles.
CASES = [
    ("nf4", 64, False, 5, 256, 512, F32),
    ("fp4", 64, True, 80, 128, 512, F32),
    ("nf4", 128, True, 5, 128, 768, F32),
    ("nf4", 128, True, 5, 128, 768, BF16),
    ("fp4", 128, False, 16, 256, 256, BF16),
    ("nf4", 512, False, 5, 128, 1024, F32),
]


def _normal(shape, dtype=jnp.float32, seed=0):
    """numpy draws: jax.random would compile anew for every shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32)).astype(dtype)


@functools.cache
def _operands(quant_type, blocksize, double_quant, n, k):
    """A random weight [n, k] quantized: (q, packed [n, k / 2], scales [n, k / blocksize])."""
    w = _normal((n, k))
    q = quant.quantize(w, quant_type, blocksize, double_quant)
    scales = quant.block_absmax(q).reshape(n, k // blocksize)
    return q, q.packed.reshape(n, k // 2), scales


def _assert_close(actual, expected, dtype):
    """float32: only the summation order differs. bfloat16: both sides multiply the same
    bfloat16 weights exactly and sum in float32, so rounding the (nearly equal) sums to bfloat16
    gives the same value, or rarely one differing by an ulp (at most 2**-7 of the value); weights
    rounded otherwise (e.g. code and scale cast before their product) change about half."""
    assert actual.dtype == expected.dtype == dtype
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = np.abs(expected).max()
    rtol = 1e-5 if dtype == F32 else 2.0**-7
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-5 * scale)
    if dtype == BF16:
        assert np.mean(actual == expected) > 0.95


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(map(str, c[:-1] + (c[-1].__name__,)))
)
def test_kernels_match_dequantize_then_dot(case):
    quant_type, blocksize, double_quant, m, n, k, dtype = case
    q, packed, scales = _operands(quant_type, blocksize, double_quant, n, k)
    code = codebooks.CODES[quant_type]
    w = quant.dequantize(q, dtype)
    x = _normal((m, k), dtype, seed=1)
    g = _normal((m, n), dtype, seed=2)

    y = kernels.fused_matmul(x, packed, scales, code, blocksize, interpret=INTERPRET)
    dx = kernels.fused_matmul_transposed(g, packed, scales, code, blocksize, interpret=INTERPRET)

    _assert_close(y, jnp.dot(x, w.T, preferred_element_type=F32).astype(dtype), dtype)
    _assert_close(dx, jnp.dot(g, w, preferred_element_type=F32).astype(dtype), dtype)


def test_swapped_nibbles_fail_the_comparison():
    """The float32 tolerance is tight enough to catch the nibbles read the wrong way round (W's
    even and odd columns swapped)."""
    q, packed, scales = _operands("nf4", 64, False, 256, 512)
    x = _normal((5, 512), seed=1)
    swapped = (packed << 4) | (packed >> 4)
    y = kernels.fused_matmul(x, swapped, scales, codebooks.CODES["nf4"], 64, interpret=INTERPRET)
    with pytest.raises(AssertionError):
        _assert_close(y, x @ quant.dequantize(q, F32).T, F32)


def test_supports():
    assert kernels.supports(5, 128, 512, 64)
    assert kernels.supports(1, 256, 4096, 4096)
    assert not kernels.supports(5, 128, 768, 512)  # K % blocksize != 0: blocks cross rows
    assert not kernels.supports(5, 128, 320, 64)  # K not a multiple of the K tile
    assert not kernels.supports(5, 100, 512, 64)  # N not a multiple of the N tile
    assert not kernels.supports(5, 128, 512, 48)  # not a bitsandbytes blocksize
    assert not kernels.supports(0, 128, 512, 64)


def test_unsupported_shapes_and_traced_codebooks_are_refused():
    _, packed, scales = _operands("nf4", 64, False, 256, 512)
    code = codebooks.CODES["nf4"]
    x = jnp.ones((4, 512), F32)
    with pytest.raises(ValueError, match="scales has shape"):
        kernels.fused_matmul(x, packed, scales[:, :2], code, 64, interpret=INTERPRET)
    with pytest.raises(ValueError, match="kernels.supports"):
        kernels.fused_matmul_transposed(
            jnp.ones((4, 64), F32), packed[:64], scales[:64], code, 64, interpret=INTERPRET
        )
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda c: kernels.fused_matmul(x, packed, scales, c, 64, interpret=INTERPRET))(code)
