"""The linear and embedding ops every model in jpeft calls.

Model code never branches on adapters. It calls `linear(x, w, bias)` and `embed(ids, w)`, where
`w` is either a plain array or an *adapted weight*: a pytree node made by `jpeft.inject` that
holds the frozen base weight together with the adapter pieces for that module (LoRA, DoRA, ...).
Each method defines its own node class in `jpeft/methods/`; the node knows how to compute its
linear op and its merged weight, so adding a method never touches this file.

Weights are stored in Hugging Face orientation, `[out_features, in_features]`, so that param
paths and shapes map one to one onto PyTorch checkpoints and PEFT files.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jax import lax


@runtime_checkable
class AdaptedWeight(Protocol):
    """A weight leaf replaced by a method's node; see `jpeft.methods`."""

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out], base op plus the adapter's change."""

    def embed(self, ids: jax.Array) -> jax.Array:
        """`ids` [...] int -> [..., dim], for adapters placed on an embedding table."""


def dense(x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Plain `x @ w.T + bias`: `x` [..., in], `w` [out, in], `bias` [out] -> [..., out]."""
    y = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


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
