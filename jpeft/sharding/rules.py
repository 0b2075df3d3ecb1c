"""Partition rules: which mesh axes split each dimension of each param.

A rule is `(pattern, dims)`: `pattern` is a regex searched in the param's dotted tree path
(`model.layers.self_attn.q_proj.weight`), `dims` names the mesh axis (or axes, or None) of each
dimension of one layer's tensor in Hugging Face orientation (`[out, in]` for a linear weight).
The first matching rule wins; a param no rule matches is replicated. A stacked leaf
(`[L, out, in]`) gets None for its layer axis. A dimension its axes do not divide evenly is
replicated instead (a 2-way `model` axis cannot split 5 heads' worth of rows), so every rule set
works on every mesh; `param_specs` shows what each param got.

LLAMA_RULES (Llama, Mistral, Qwen2, Qwen3): Megatron-style tensor parallelism over `model`
(q/k/v/gate/up split by output rows = heads and intermediate units, o/down by input columns) and
FSDP over `fsdp` on the other dimension; the head's vocabulary over `model`, the embedding
table's rows over both.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jax.sharding import Mesh, PartitionSpec

from jpeft import tree as jtree
from jpeft.quant.formats import QuantizedTensor

Dims = tuple[str | tuple[str, ...] | None, ...]
Rules = Sequence[tuple[str, Dims]]

LLAMA_RULES: Rules = (
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", ("model", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", ("model",)),
    (r"(o_proj|down_proj)\.weight$", ("fsdp", "model")),
    # the table split by rows only: a lookup then needs no change of layout for the batch split
    (r"embed_tokens\.weight$", (("fsdp", "model"), None)),
    (r"lm_head\.weight$", ("model", "fsdp")),
)


def param_specs(params: Mapping[str, Any], mesh: Mesh, rules: Rules = LLAMA_RULES) -> Any:
    """A tree like `params` with a `PartitionSpec` per array; a QuantizedTensor leaf gets a
    QuantizedTensor of specs (see `quantized_spec`)."""
    flat = jtree.flatten(params)
    logical = logical_specs(params, mesh, rules)
    return jtree.unflatten(
        {
            path: quantized_spec(leaf, logical[path], mesh)
            if isinstance(leaf, QuantizedTensor)
            else logical[path]
            for path, leaf in flat.items()
        }
    )


def logical_specs(
    params: Mapping[str, Any], mesh: Mesh, rules: Rules = LLAMA_RULES
) -> dict[str, PartitionSpec]:
    """{dotted path: spec of the float tensor}: for a 4-bit weight, the spec its float form has."""
    stacked = stacked_paths(params)
    return {
        path: logical_spec(path, jtree.leaf_shape(leaf), path in stacked, mesh, rules)
        for path, leaf in jtree.flatten(params).items()
    }


def stacked_paths(params: Mapping[str, Any]) -> set[str]:
    """Dotted paths of the leaves that carry a leading stacked-layer axis."""
    return {path for path in jtree.flatten(params) if jtree.is_stacked_leaf(params, path)}


def logical_spec(
    path: str, shape: tuple[int, ...], stacked: bool, mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """The spec of the float tensor `shape` at `path` (its first axis the layers if `stacked`)."""
    layer_shape = shape[1:] if stacked else shape
    dims = matching_dims(path, rules, len(layer_shape))
    fitted = fit_dims(dims, layer_shape, mesh)
    return PartitionSpec(*((None,) if stacked else ()), *fitted)


def matching_dims(path: str, rules: Rules, ndim: int) -> Dims:
    """The first rule's dims for `path`, or all None; ValueError if the rank differs."""
    for pattern, dims in rules:
        if re.search(pattern, path):
            if len(dims) != ndim:
                raise ValueError(
                    f"partition rule {pattern!r} gives {len(dims)} dims {dims} but {path} has "
                    f"{ndim} (per layer); write one entry per dimension"
                )
            return tuple(dims)
    return (None,) * ndim


def fit_dims(dims: Dims, shape: Sequence[int], mesh: Mesh) -> Dims:
    """`dims` with None wherever the named axes do not divide that dimension (or are absent)."""
    return tuple(
        axes if axes is not None and size % axes_size(mesh, axes) == 0 else None
        for axes, size in zip(dims, shape, strict=True)
    )


def axes_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    """Devices along `axes` (1 for None); ValueError for an axis the mesh lacks."""
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    missing = [a for a in names if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh axes {missing} are not in the mesh {dict(mesh.shape)}")
    return math.prod(mesh.shape[a] for a in names)


def axis_names(spec_entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def quantized_spec(q: QuantizedTensor, logical: PartitionSpec, mesh: Mesh) -> QuantizedTensor:
    """Specs for a 4-bit weight whose float form would have `logical`.

    The flat codes and per-block scales are split along the weight's output axis (row-major, so
    a contiguous run of rows is a contiguous run of blocks) over every mesh axis the float weight
    uses, in whole blocks: each device holds whole rows and whole blocks. When the split would cut
    a row or a block they are replicated. The double-quantization tables (one scale per 256
    blocks, the code map and offset) are small and replicated.
    """
    stack = len(q.stack_shape)
    axes = tuple(a for entry in tuple(logical)[stack:] for a in axis_names(entry))
    shards = axes_size(mesh, axes) if axes else 1
    rows = q.weight_shape[0] if q.weight_shape else 1
    per_shard = q.weight_size // shards if shards else 0
    whole = (
        shards > 1
        and rows % shards == 0
        and q.weight_size % shards == 0
        and per_shard % q.blocksize == 0
        and per_shard % 2 == 0
    )
    split = PartitionSpec(*(None,) * stack, axes if whole else None)

    def replicated_if_present(table):
        return None if table is None else PartitionSpec()

    return dataclasses.replace(
        q,
        packed=split,
        absmax=split,
        nested_absmax=replicated_if_present(q.nested_absmax),
        nested_code=replicated_if_present(q.nested_code),
        offset=replicated_if_present(q.offset),
    )
