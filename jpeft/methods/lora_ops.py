"""The LoRA forward ops: factored, never forming W + s B A in the training forward.

`lora_linear` is the op every LoRA-adapted projection runs. Its plain-LoRA path is a `custom_vjp`
whose backward computes only what training needs: dX = dY W + s (dY B) A and the factor gradients,
saving x and x A^T as residuals; the frozen W is never differentiated (no weight-sized gradient).
W may be a 4-bit quantized weight (QLoRA); `dense` and `dense_transposed` then run the quantized
matmul, and the residual W is its packed codes and scales.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jpeft.ops import as_array, dense, dense_transposed

# `w` below is a `jpeft.methods.lora.LoraWeight` / `LoraEmbedding` node (not imported here:
# lora.py imports this module).
LoraWeight = LoraEmbedding = Any


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (torch's nn.Dropout); identity when `key` is None (inference) or `rate`
    is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _matmul_last(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., k] times w [n, k] -> [..., n]."""
    return lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))


@jax.custom_vjp
def _factored_lora(x, xd, base, lora_a, lora_b, scaling):
    """x W^T + s (xd A^T) B^T: x, xd [..., in]; base [out, in] (array or quantized); A [r, in];
    B [out, r]."""
    return dense(x, base) + _matmul_last(_matmul_last(xd, lora_a), lora_b) * scaling


def _factored_lora_fwd(x, xd, base, lora_a, lora_b, scaling):
    hidden = _matmul_last(xd, lora_a)
    out = dense(x, base) + _matmul_last(hidden, lora_b) * scaling
    return out, (xd, hidden, base, lora_a, lora_b, scaling)


def _factored_lora_bwd(residuals, grad_out):
    xd, hidden, base, lora_a, lora_b, scaling = residuals
    rows = grad_out.reshape(-1, grad_out.shape[-1])
    grad_hidden = _matmul_last(grad_out, lora_b.T) * scaling  # [..., r]
    grad_x = dense_transposed(grad_out, base)
    grad_xd = _matmul_last(grad_hidden, lora_a.T)
    grad_b = (rows.T @ hidden.reshape(-1, hidden.shape[-1])) * scaling
    grad_a = grad_hidden.reshape(-1, grad_hidden.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])
    # None: a symbolic zero; the frozen base (and the constant scaling) get no gradient at all.
    return grad_x, grad_xd, None, grad_a.astype(lora_a.dtype), grad_b.astype(lora_b.dtype), None


_factored_lora.defvjp(_factored_lora_fwd, _factored_lora_bwd)


def lora_linear(x: jax.Array, w: LoraWeight, bias: jax.Array | None) -> jax.Array:
    """`x` [..., in] -> [..., out] for a LoRA/DoRA-adapted weight (one layer's slice)."""
    scaling = jnp.asarray(w.scaling, x.dtype)
    xd = dropout(x, w.dropout_rate, w.dropout_key)
    if w.magnitude is None and w.init_A is None:
        out = _factored_lora(x, xd, w.base, w.lora_A, w.lora_B, scaling)
        return out if bias is None else out + bias.astype(out.dtype)
    adapted = _matmul_last(_matmul_last(xd, w.lora_A), w.lora_B) * scaling
    base_out = dense(x, w.base) - _start_term(x, w, scaling)
    if w.magnitude is None:
        out = base_out + adapted
        return out if bias is None else out + bias.astype(out.dtype)
    factor = _dora_factor(w).astype(x.dtype)
    if w.dropout_key is None:
        out = factor * (base_out + adapted)
        return out if bias is None else out + bias.astype(out.dtype)
    dropped_base = dense(xd, w.base) - _start_term(xd, w, scaling)
    out = base_out + (factor - 1) * dropped_base + factor * adapted
    return out if bias is None else out + bias.astype(out.dtype)


def _start_term(x: jax.Array, w: LoraWeight, scaling: jax.Array) -> jax.Array:
    """s (x A0^T) B0^T for PiSSA/OLoRA's frozen start, zero otherwise."""
    if w.init_A is None:
        return jnp.zeros((), x.dtype)
    return _matmul_last(_matmul_last(x, w.init_A), w.init_B) * scaling


def _dora_factor(w: LoraWeight) -> jax.Array:
    """m / ||W + s B A||_row [out], the norm without gradient; 1 on layers without the adapter."""
    weight = as_array(w.base, jnp.float32) + lax.stop_gradient(w.delta().astype(jnp.float32))
    norm = lax.stop_gradient(jnp.linalg.norm(weight, axis=-1))
    factor = w.magnitude.astype(jnp.float32) / norm
    if w.active is not None:
        factor = jnp.where(w.active, factor, 1.0)
    return factor


def lora_embed(ids: jax.Array, w: LoraEmbedding) -> jax.Array:
    """`ids` [...] -> [..., dim]: table[ids] + s (A^T[ids]) B^T, no dropout (as PEFT)."""
    base = jnp.take(w.base, ids, axis=0)
    hidden = jnp.take(w.lora_A.T, ids, axis=0)  # [..., r]
    delta = _matmul_last(hidden, w.lora_B) * jnp.asarray(w.scaling, hidden.dtype)
    return base + delta.astype(base.dtype)
