"""Sharding on a (data, fsdp, model) device mesh: one process, or every host of a TPU pod.

mesh = jpeft.sharding.make_mesh(data=2, fsdp=-1, model=1)
params = jpeft.sharding.shard(params, mesh)                 # partition rules per family
adapter = jpeft.sharding.shard(adapter, mesh, like=params)  # specs derived from the base
batch = jpeft.sharding.shard_batch(batch, mesh)
"""

from jpeft.activations import constrain_batch, traced_on
from jpeft.sharding.adapter_specs import adapter_specs
from jpeft.sharding.distributed import initialize
from jpeft.sharding.mesh import AXES, BATCH_AXES, batch_size_multiple, make_mesh, parse_mesh
from jpeft.sharding.placement import (
    StepShardings,
    batch_sharding,
    gather,
    init_optimizer,
    loading_placer,
    optimizer_shardings,
    place,
    replicated,
    shard,
    shard_batch,
    shardings,
    step_shardings,
)
from jpeft.sharding.rules import LLAMA_RULES, logical_specs, param_specs

__all__ = [
    "AXES",
    "BATCH_AXES",
    "LLAMA_RULES",
    "adapter_specs",
    "batch_sharding",
    "batch_size_multiple",
    "constrain_batch",
    "gather",
    "init_optimizer",
    "initialize",
    "loading_placer",
    "logical_specs",
    "make_mesh",
    "optimizer_shardings",
    "param_specs",
    "parse_mesh",
    "place",
    "replicated",
    "shard",
    "shard_batch",
    "shardings",
    "step_shardings",
    "traced_on",
    "StepShardings",
]
