"""Merging several task tensors into one, as PEFT's `utils/merge_utils.py` does.

Each function takes the tensors of n tasks (same shape) and their weights [n], and returns one
tensor of that shape, computed in the tensors' dtype:

- `task_arithmetic`: sum_i w_i T_i;
- `magnitude_prune`: each T_i keeps its `int(density * size)` largest entries by magnitude (the
  others become 0), then the weighted sum;
- `ties` (Yadav et al. 2023): magnitude pruning, then a sign elected per entry from the unweighted
  pruned tensors (`"total"`: the sign of their sum; `"frequency"`: of the sum of their signs; 0
  counts as +), and the mean of the weighted entries that carry the elected sign;
- `dare_linear` / `dare_ties` (Yu et al. 2023): each entry kept with probability `density` and
  divided by it, then the weighted sum / the sign election and mean of `ties`.

DARE's draws come from a JAX key, so they are reproducible but not torch's (PEFT draws from the
global torch generator). A `density` >= 1 prunes nothing (PEFT warns, and so does jpeft); a
negative one is an error, as is none at all for the pruning methods.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
SIGN_METHODS = ("total", "frequency")


def task_arithmetic(tensors: Sequence[Array], weights: Sequence[float]) -> Array:
    """sum_i w_i T_i."""
    return _weighted(jnp.stack(tensors), weights).sum(axis=0)


def magnitude_prune(tensors: Sequence[Array], weights: Sequence[float], density: float) -> Array:
    """The weighted sum of the tensors, each pruned to its largest `density` share."""
    pruned = jnp.stack([prune_magnitude(t, density) for t in tensors])
    return _weighted(pruned, weights).sum(axis=0)


def ties(
    tensors: Sequence[Array], weights: Sequence[float], density: float, sign_method: str = "total"
) -> Array:
    """TIES: magnitude pruning, sign election, disjoint mean."""
    pruned = jnp.stack([prune_magnitude(t, density) for t in tensors])
    return _disjoint_mean(pruned, weights, sign_method)


def dare_linear(
    tensors: Sequence[Array], weights: Sequence[float], density: float, key: Array
) -> Array:
    """DARE: random pruning with rescaling, then the weighted sum."""
    dropped = _prune_random_all(tensors, density, key)
    return _weighted(dropped, weights).sum(axis=0)


def dare_ties(
    tensors: Sequence[Array],
    weights: Sequence[float],
    density: float,
    key: Array,
    sign_method: str = "total",
) -> Array:
    """DARE's random pruning with rescaling, then TIES' sign election and disjoint mean."""
    return _disjoint_mean(_prune_random_all(tensors, density, key), weights, sign_method)


def prune_magnitude(tensor: Array, density: float) -> Array:
    """`tensor` with all but its `int(density * size)` largest-magnitude entries set to 0."""
    if not _prunes(density):
        return tensor
    flat = tensor.reshape(-1)
    keep = int(density * flat.size)
    mask = jnp.zeros(flat.shape, bool).at[jax.lax.top_k(jnp.abs(flat), keep)[1]].set(True)
    return jnp.where(mask, flat, 0).reshape(tensor.shape)


def prune_random(tensor: Array, density: float, key: Array) -> Array:
    """Each entry kept with probability `density` and divided by it (its expected value kept)."""
    if not _prunes(density):
        return tensor
    keep = jax.random.bernoulli(key, density, tensor.shape)
    return jnp.where(keep, tensor, 0) / jnp.asarray(density, tensor.dtype)


def _prune_random_all(tensors: Sequence[Array], density: float, key: Array) -> Array:
    keys = jax.random.split(key, len(tensors))
    return jnp.stack([prune_random(t, density, k) for t, k in zip(tensors, keys, strict=True)])


def _prunes(density: float) -> bool:
    """Whether `density` prunes anything: False (with PEFT's warning) at >= 1."""
    if density is None:
        raise ValueError(
            "density is None, and the ties, dare and magnitude_prune combinations need the "
            "share of entries to keep: pass density= (a number in [0, 1])"
        )
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if density >= 1:
        warnings.warn(
            f"The density {density} is greater than or equal to 1, no pruning will be performed.",
            stacklevel=4,
        )
        return False
    return True


def _weighted(stacked: Array, weights: Sequence[float]) -> Array:
    """[n, ...] tensors times their weights [n]."""
    w = jnp.asarray(weights, stacked.dtype)
    return stacked * w.reshape(w.shape + (1,) * (stacked.ndim - 1))


def _disjoint_mean(stacked: Array, weights: Sequence[float], sign_method: str) -> Array:
    """The mean of the weighted entries whose sign is the one elected from `stacked` [n, ...]."""
    if sign_method == "total":
        votes = stacked.sum(axis=0)
    elif sign_method == "frequency":
        votes = jnp.sign(stacked).sum(axis=0)
    else:
        raise ValueError(f"majority_sign_method={sign_method!r}; use one of {list(SIGN_METHODS)}")
    elected = jnp.where(votes >= 0, 1, -1).astype(stacked.dtype)
    agree = jnp.sign(stacked) == elected
    total = jnp.where(agree, _weighted(stacked, weights), 0).sum(axis=0)
    return total / jnp.maximum(agree.sum(axis=0), 1).astype(stacked.dtype)
