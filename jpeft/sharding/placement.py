"""Placing params, adapters, optimizer state and batches on a mesh, one process or many.

Every process of a multi-host run calls the same functions with the same (global) values; each
builds only the shards its own devices hold, with `jax.make_array_from_callback`, so nothing is
sent between hosts and a host never needs memory for more than its value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpeft.adapter import Adapter, is_trainable, partition
from jpeft.method import optimizer_for
from jpeft.quant.formats import QuantizedTensor
from jpeft.sharding.adapter_specs import adapter_specs
from jpeft.sharding.mesh import BATCH_AXES, batch_size_multiple
from jpeft.sharding.rules import LLAMA_RULES, Rules, logical_spec, param_specs, quantized_spec
from jpeft.tree import leaf_shape


def is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def named(mesh: Mesh, specs: Any) -> Any:
    """A tree of `PartitionSpec`s -> the same tree of `NamedSharding`s on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=is_spec)


def shardings(
    tree: Any, mesh: Mesh, like: Mapping[str, Any] | None = None, rules: Rules = LLAMA_RULES
) -> Any:
    """The `NamedSharding` of every leaf `shard` would give: `tree` is a param tree, or an
    Adapter (its specs derived from the params `like`)."""
    if isinstance(tree, Adapter):
        if like is None:
            raise ValueError(
                "sharding an adapter needs the params it adapts: shard(adapter, mesh, like=params) "
                "(each adapter dimension takes the spec of the base weight dimension it follows)"
            )
        return named(mesh, adapter_specs(tree, like, mesh, rules))
    if isinstance(tree, Mapping):
        return named(mesh, param_specs(tree, mesh, rules))
    raise TypeError(
        f"shard() takes a param dict or an Adapter, got {type(tree).__name__}; for optimizer "
        "state use jpeft.sharding.init_optimizer, for batches shard_batch"
    )


def shard(
    tree: Any, mesh: Mesh, like: Mapping[str, Any] | None = None, rules: Rules = LLAMA_RULES
) -> Any:
    """`tree` (params, 4-bit weights included, or an Adapter with `like=params`) on `mesh`.

    Params follow `rules`; 4-bit weights are split in whole blocks along the output axis; an
    adapter's dimensions follow the base weight dimensions they run along (see
    `adapter_specs`). Values may be numpy arrays or arrays on any devices.
    """
    return place(tree, shardings(tree, mesh, like, rules))


def place(tree: Any, target: Any) -> Any:
    """Every leaf of `tree` put on its `NamedSharding` in `target` (a tree of the same shape)."""
    return jax.tree.map(_place_leaf, tree, target)


def _place_leaf(value: Any, sharding: NamedSharding) -> jax.Array:
    """One array on `sharding`: moved by XLA when it is already global (or there is one
    process), else each process slices its own devices' parts out of its copy."""
    if isinstance(value, jax.Array):
        if jax.process_count() == 1 or not value.is_fully_addressable:
            return jax.device_put(value, sharding)
    else:
        value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def loading_placer(mesh: Mesh, rules: Rules | None = None):
    """`place(path, value, stacked)` for `jpeft.models.from_pretrained(..., mesh=mesh)`: each
    loaded leaf (a host array, or a 4-bit weight) straight to its shards on `mesh`."""
    rules = LLAMA_RULES if rules is None else rules

    def place_leaf(path: str, value: Any, stacked: bool) -> Any:
        spec = logical_spec(path, leaf_shape(value), stacked, mesh, rules)
        if isinstance(value, QuantizedTensor):
            return place(value, named(mesh, quantized_spec(value, spec, mesh)))
        return _place_leaf(value, NamedSharding(mesh, spec))

    return place_leaf


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over `data` x `fsdp`, everything else whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """A tree of [batch, ...] arrays (the same global batch on every process) on the mesh.

    ValueError unless the batch size is a multiple of the data x fsdp devices.
    """
    multiple = batch_size_multiple(mesh)
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    bad = sorted(s for s in sizes if s % multiple)
    if bad:
        raise ValueError(
            f"batch size {bad[0]} does not split over the mesh's data x fsdp = {multiple} "
            f"devices; use a batch size that is a multiple of {multiple}"
        )
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: _place_leaf(x, sharding), batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def gather(tree: Any) -> Any:
    """Every leaf replicated on the mesh, so each process can read it whole (to save it); one
    compiled copy for the whole tree. A tree with no split leaf is returned as it is."""
    split = [
        x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and not x.is_fully_replicated
    ]
    if not split:
        return tree
    return jax.jit(lambda t: t, out_shardings=replicated(split[0].sharding.mesh))(tree)


def optimizer_shardings(
    optimizer: optax.GradientTransformation, trainable: Any, trainable_shardings: Any
) -> Any:
    """The sharding of each leaf of the adapter's optimizer state (`jpeft.train.init_opt_state`):
    moments like their param, everything else (step counts) replicated."""
    optimizer = optimizer_for(optimizer, trainable)
    abstract = jax.eval_shape(optimizer.init, trainable)
    mesh = jax.tree.leaves(trainable_shardings)[0].mesh
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract,
        trainable_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: x is None,
    )


def init_optimizer(optimizer: optax.GradientTransformation, trainable: Any) -> Any:
    """`jpeft.train.init_opt_state(optimizer, trainable)` with each moment sharded like its
    (placed) param."""
    target = optimizer_shardings(
        optimizer, trainable, jax.tree.map(lambda x: x.sharding, trainable)
    )
    return jax.jit(optimizer_for(optimizer, trainable).init, out_shardings=target)(trainable)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """The `in_shardings`/`out_shardings` of a train step `step(params, adapter, opt_state,
    batch, dropout_key)` on `mesh`; see `jpeft.train.make_train_step`."""

    mesh: Mesh
    params: Any
    adapter: Any
    opt_state: Any
    batch: NamedSharding
    replicated: NamedSharding


def step_shardings(
    mesh: Mesh,
    params: Mapping[str, Any],
    adapter: Adapter,
    optimizer: optax.GradientTransformation,
    rules: Rules = LLAMA_RULES,
) -> StepShardings:
    """Every argument's sharding for a train step on `mesh`, from the partition rules."""
    adapter_target = shardings(adapter, mesh, like=params, rules=rules)
    trainable, _ = partition(adapter, is_trainable)
    trainable_target, _ = partition(adapter_target, is_trainable)
    return StepShardings(
        mesh=mesh,
        params=shardings(params, mesh, rules=rules),
        adapter=adapter_target,
        opt_state=optimizer_shardings(optimizer, trainable, trainable_target),
        batch=batch_sharding(mesh),
        replicated=replicated(mesh),
    )
