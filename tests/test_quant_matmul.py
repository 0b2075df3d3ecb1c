"""The quantized matmul: values, input gradient, what it keeps for the backward pass, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.quant import dequantize, kernels, quantize, quantized_matmul
from jpeft.quant import matmul as quant_matmul
from jpeft.quant.matmul import ENV_VAR

OUT, IN = 128, 256  # shapes the Pallas kernels take


@pytest.fixture(scope="module")
def weight():
    w = jax.random.normal(jax.random.key(0), (OUT, IN), jnp.float32)
    return quantize(w, "nf4", 64, double_quant=True)


def naive(x, q, dtype=jnp.float32):
    return (x.astype(dtype) @ dequantize(q, dtype).T).astype(x.dtype)


def test_forward_and_input_gradient_equal_dequantize_then_dot(weight):
    x = jax.random.normal(jax.random.key(1), (2, 5, IN), jnp.float32)
    np.testing.assert_array_equal(quantized_matmul(x, weight), naive(x, weight))
    g = jax.random.normal(jax.random.key(2), (2, 5, OUT), jnp.float32)
    ours = jax.vjp(lambda x: quantized_matmul(x, weight), x)[1](g)[0]
    expected = jax.vjp(lambda x: naive(x, weight), x)[1](g)[0]
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_backward_keeps_codes_and_scales_not_the_float_weight(weight):
    """The residuals of the vjp are the packed codes and scales; dequantize-then-dot keeps the
    [out, in] float weight, which is what QLoRA must avoid."""
    x = jnp.ones((3, IN), jnp.float32)
    weight_size = OUT * IN

    def float_residuals(fn):
        vjp = jax.vjp(fn, x)[1]
        return [
            sorted(leaf.shape)
            for leaf in jax.tree.leaves(vjp)
            if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size >= weight_size
        ]

    assert float_residuals(lambda x: quantized_matmul(x, weight)) == []
    assert float_residuals(lambda x: naive(x, weight)) == [sorted((OUT, IN))]


def test_frozen_weight_gets_no_gradient(weight):
    def loss(q):
        return jnp.sum(quantized_matmul(jnp.ones((2, IN)), q))

    grads = jax.grad(loss, allow_int=True)(weight)
    floats = [g for g in jax.tree.leaves(grads) if jnp.issubdtype(g.dtype, jnp.floating)]
    assert floats and all(not np.any(np.asarray(g)) for g in floats)


def test_compute_dtype_casts_input_and_weight_and_returns_input_dtype(weight):
    x = jax.random.normal(jax.random.key(3), (4, IN), jnp.float32)
    y = quantized_matmul(x, weight, compute_dtype=jnp.bfloat16)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, naive(x, weight, jnp.bfloat16))
    assert not np.array_equal(y, naive(x, weight))  # bfloat16 rounding is visible


def test_interpreted_kernels_match_reference_under_jit(weight, monkeypatch):
    """JPEFT_QUANT_MATMUL=interpret runs both Pallas kernels (forward and input gradient)."""
    calls = []

    def spy(name):
        original = getattr(kernels, name)

        def recorded(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return recorded

    for name in ("fused_matmul", "fused_matmul_transposed"):
        monkeypatch.setattr(kernels, name, spy(name))
    x = jax.random.normal(jax.random.key(4), (6, IN), jnp.float32)
    g = jax.random.normal(jax.random.key(5), (6, OUT), jnp.float32)

    def value_and_input_grad(x):
        y, vjp = jax.vjp(lambda x: quantized_matmul(x, weight), x)
        return y, vjp(g)[0]

    expected = jax.jit(value_and_input_grad)(x)
    assert calls == []
    monkeypatch.setenv(ENV_VAR, "interpret")
    got = jax.jit(lambda x: value_and_input_grad(x))(x)  # a new function: traced again
    assert calls == ["fused_matmul", "fused_matmul_transposed"]
    for ours, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_bad_operands_are_refused(weight, monkeypatch):
    with pytest.raises(ValueError, match="takes 256"):
        quantized_matmul(jnp.ones((2, IN + 1)), weight)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), weight)
    with pytest.raises(ValueError, match=r"shape \(2, 128, 256\); index a stack"):
        quantized_matmul(jnp.ones((2, IN)), stacked)
    with pytest.raises(ValueError, match="impl must be one of"):
        quantized_matmul(jnp.ones((2, IN)), weight, impl="triton")
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='fast'"):
        quantized_matmul(jnp.ones((2, IN)), weight)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_auto_is_the_plain_path_on_every_backend(monkeypatch, backend):
    """On an H200 the kernels ran a QLoRA step 7.4x slower than the plain path and failed on
    float32 tiles (benchmarks/gpu_kernels.py), and no TPU has compiled them: opt-in only."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert quant_matmul._resolve("auto") == "reference"
    monkeypatch.setenv(ENV_VAR, "pallas")
    assert quant_matmul._resolve("auto") == "pallas"
