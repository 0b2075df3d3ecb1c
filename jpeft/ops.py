"""The linear and embedding ops every model in jpeft calls.

Model code never branches on adapters. It calls `linear(x, w, bias)` and `embed(ids, w)`, where
`w` is either a plain array or an *adapted weight*: a pytree node made by `jpeft.injection` that
holds the frozen base weight together with the adapter pieces for that module (LoRA, DoRA, ...).
Each method defines its own node class in `jpeft/methods/`; the node knows how to compute its
linear op and its merged weight, so adding a method never touches this file.

A base weight may also be a 4-bit `jpeft.quant.QuantizedTensor` (QLoRA): `dense` then runs the
quantized matmul, whose backward keeps no float copy of the weight, and an adapter node holding a
quantized base goes through the same `dense`.

Weights are stored in Hugging Face orientation, `[out_features, in_features]`, so that param
paths and shapes map one to one onto PyTorch checkpoints and PEFT files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jax import lax

from jpeft.quant.formats import QuantizedTensor, dequantize
from jpeft.quant.matmul import quantized_matmul, quantized_matmul_transposed


@runtime_checkable
class AdaptedWeight(Protocol):
    """A weight leaf replaced by a method's node; see `jpeft.methods`."""

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out], base op plus the adapter's change."""

    def embed(self, ids: jax.Array) -> jax.Array:
        """`ids` [...] int -> [..., dim], for adapters placed on an embedding table."""


class WeightView(ABC):
    """A frozen weight kept in its own layout, seen as [out, in]: it computes the two products
    `dense` needs on the stored array (a Flax kernel [in, out] or [*in, *out], `jpeft.flax`), so
    no [out, in] copy is formed, nor kept for the backward pass. `astype(dtype)` gives the
    [out, in] array (for merges and methods that change the weight itself)."""

    shape: tuple[int, ...]
    dtype: jnp.dtype

    @abstractmethod
    def dense(self, x: jax.Array) -> jax.Array:
        """`x` [..., in] -> `x @ W.T` [..., out]."""

    @abstractmethod
    def dense_transposed(self, g: jax.Array) -> jax.Array:
        """`g` [..., out] -> `g @ W` [..., in]."""

    @abstractmethod
    def astype(self, dtype: jax.typing.DTypeLike) -> jax.Array:
        """The [out, in] weight in `dtype`."""


def dense(x: jax.Array, w, bias: jax.Array | None = None) -> jax.Array:
    """Plain `x @ w.T + bias`: `x` [..., in], `w` [out, in] (an array, a quantized weight or a
    `WeightView`), `bias` [out] -> [..., out]."""
    if isinstance(w, QuantizedTensor):
        y = quantized_matmul(x, w)
    elif isinstance(w, WeightView):
        y = w.dense(x)
    else:
        y = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def dense_transposed(g: jax.Array, w) -> jax.Array:
    """`g @ w`: `g` [..., out], `w` [out, in] (an array or a quantized weight) -> [..., in]; the
    input gradient of `dense`."""
    if isinstance(w, QuantizedTensor):
        return quantized_matmul_transposed(g, w)
    if isinstance(w, WeightView):
        return w.dense_transposed(g)
    return lax.dot_general(g, w.astype(g.dtype), (((g.ndim - 1,), (0,)), ((), ())))


def as_array(w, dtype: jax.typing.DTypeLike | None = None) -> jax.Array:
    """The weight as an array in `dtype` (default: its own): a quantized weight is dequantized."""
    if isinstance(w, QuantizedTensor):
        return dequantize(w, dtype)
    if isinstance(w, WeightView):
        return w.astype(w.dtype if dtype is None else dtype)
    return w if dtype is None else w.astype(dtype)


def linear(x: jax.Array, w, bias: jax.Array | None = None) -> jax.Array:
    """The linear layer of every model: `x` [..., in], `w` [out, in] or an adapted weight."""
    if isinstance(w, AdaptedWeight):
        return w.linear(x, bias)
    return dense(x, w, bias)


def embed(ids: jax.Array, w) -> jax.Array:
    """Embedding lookup: `ids` [...] int, `w` [vocab, dim] or an adapted weight -> [..., dim]."""
    if isinstance(w, AdaptedWeight):
        return w.embed(ids)
    return jnp.take(w, ids, axis=0)
