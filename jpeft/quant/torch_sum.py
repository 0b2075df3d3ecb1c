"""torch's float32 sum on CPU, replayed in jnp so that a mean matches torch bit for bit.

bitsandbytes stores `offset = absmax.mean()` when it double quantizes, and float32 addition is not
associative, so the order matters. torch (aten/src/ATen/native/cpu/SumKernel.cpp) sums a
contiguous float32 row with float32 accumulators:
- it reads the row as vectors of `lanes` floats (8 in the AVX2 and default builds, 16 with
  AVX-512) and deals the vectors round-robin to 4 streams;
- each stream is summed by a 4-level cascade: level 0 adds 2**k vectors one after the other and
  hands the sum to level 1, which hands a sum of 2**k of those to level 2, which hands a sum of
  2**k of those to level 3; k = max(4, ceil(log2(vectors per stream)) // 4). At the end the
  unfinished level sums are added, level 0 first;
- leftover vectors go to stream 0, then streams 1, 2, 3 are added to stream 0; finally one
  running float sum from 0 takes the leftover floats, then the lanes, in order.
A row shorter than `lanes` goes the same way with single floats in place of vectors.
This is the order of one thread; torch splits rows of 32768 floats or more between threads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

TORCH_LANES = 8
_STREAMS = 4
_LEVELS = 4


def _fold(parts: jax.Array) -> jax.Array:
    """((0 + parts[0]) + parts[1]) + ... over the leading axis, in that order."""
    total = jnp.zeros(parts.shape[1:], parts.dtype)
    for i in range(parts.shape[0]):
        total = total + parts[i]
    return total


def _fold_runs(parts: jax.Array, run: int) -> jax.Array:
    """[groups * run, ...] -> [groups, ...]: each run of `run` consecutive parts folded in order."""
    runs = parts.reshape(parts.shape[0] // run, run, *parts.shape[1:])
    return _fold(jnp.moveaxis(runs, 1, 0))


def _cascade(rows: jax.Array) -> jax.Array:
    """[n, ...] -> [...]: torch's 4-level cascade sum over the leading axis."""
    n = rows.shape[0]
    power = max(4, (max(n - 1, 0)).bit_length() // _LEVELS)
    run = 1 << power
    full = n // run * run
    level = _fold_runs(rows[:full], run)
    total = _fold(rows[full:])
    for _ in range(_LEVELS - 2):
        handed_up = level.shape[0] // run * run
        total = total + _fold(level[handed_up:])
        level = _fold_runs(level[:handed_up], run)
    return total + _fold(level)


def _row_sum(vectors: jax.Array) -> jax.Array:
    """[n, lanes] -> [lanes]: the vectors dealt to 4 streams, each summed by the cascade."""
    per_stream = vectors.shape[0] // _STREAMS
    dealt = _STREAMS * per_stream
    streams = _cascade(vectors[:dealt].reshape(per_stream, _STREAMS, vectors.shape[1]))
    total = streams[0]
    for i in range(dealt, vectors.shape[0]):
        total = total + vectors[i]
    for s in range(1, _STREAMS):
        total = total + streams[s]
    return total


def torch_cpu_sum(x: jax.Array, lanes: int = TORCH_LANES) -> jax.Array:
    """Sum of float32 `x` [n] in the order of one torch CPU thread; a float32 scalar."""
    x = jnp.ravel(x).astype(jnp.float32)
    n = x.shape[0]
    if n < lanes:
        return _row_sum(x[:, None])[0]
    whole = n // lanes * lanes
    lane_sums = _row_sum(x[:whole].reshape(whole // lanes, lanes))
    return _fold(jnp.concatenate([x[whole:], lane_sums]))


@functools.partial(jax.jit, static_argnames="lanes")
def torch_cpu_mean(x: jax.Array, lanes: int = TORCH_LANES) -> jax.Array:
    """`torch.mean` of float32 `x` [n] on CPU (one thread): the sum above divided by n.

    XLA rewrites a division by a constant as a product with its rounded reciprocal; the barrier
    hides the constant so the division stays exact, as in torch.
    """
    return torch_cpu_sum(x, lanes) / lax.optimization_barrier(jnp.float32(x.size))
