"""Sharding constraints the model puts on its activations when it runs on a mesh.

The model imports this module alone, not the `jpeft.sharding` package.

XLA propagates shardings from the inputs, but with FSDP-split weights it may choose to split the
hidden dimension instead of the batch (and run every row on every device). The model pins its
hidden states to the batch split at each layer boundary, only while it is traced under a mesh
with the batch axes (`jax.sharding.use_abstract_mesh`, which `jpeft.train.make_train_step` sets
for a sharded step), so single-device code is unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

# The mesh axes a batch is split over (`jpeft.sharding.make_mesh` builds meshes with them).
BATCH_AXES = ("data", "fsdp")


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` [batch, ...] split over the data x fsdp devices along its first axis, when traced
    under a mesh with those axes whose size divides the batch; otherwise `x` as it is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    devices = 1
    for axis in BATCH_AXES:
        devices *= mesh.shape[axis]
    if devices == 1 or x.shape[0] % devices:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES))


def traced_on(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced under `mesh`'s axes, so the model's `constrain_batch` pins its activations.
    Wrap the function you give `jax.jit`."""

    @functools.wraps(fn)
    def on_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return on_mesh
