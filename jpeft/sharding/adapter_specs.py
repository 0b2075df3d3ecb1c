"""An adapter's partition specs, derived per dimension from the base weights it adapts.

Copying a base weight's spec onto a factor of another shape is wrong (LoRA's A [r, in] is not
W [out, in]); each method declares, per piece, which base axis each of its axes runs along
(`Method.piece_axes`), and that axis's mesh axes split it. So LoRA A [r, in] takes W's
input-dim spec, B [out, r] W's output-dim spec, r replicated; IA3 vectors follow their dimension;
overrides (`modules_to_save` copies, trainable biases) take their base leaf's spec; prompt
encoders and anything undeclared are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from jpeft import tree as jtree
from jpeft.adapter import Adapter
from jpeft.method import method_for
from jpeft.sharding.rules import LLAMA_RULES, Rules, fit_dims, logical_specs


def adapter_specs(
    adapter: Adapter,
    params: Mapping[str, Any],
    mesh: Mesh,
    rules: Rules = LLAMA_RULES,
    base: Mapping[str, PartitionSpec] | None = None,
) -> Adapter:
    """An Adapter of the same structure whose leaves are `PartitionSpec`s (None leaves stay).

    `base`: the params' own specs by dotted path, when the model declares them (`jpeft.flax`
    reads them from the kernels' annotations); by default `rules` give them."""
    base = logical_specs(params, mesh, rules) if base is None else base
    axes_of = method_for(adapter.config).piece_axes

    def layer_dims(tree_path: str, layer: int | None) -> tuple | None:
        spec = base.get(tree_path)
        if spec is None:
            return None
        return tuple(spec)[1:] if layer is not None else tuple(spec)

    def module_specs(name: str, pieces: Mapping[str, Any]) -> dict[str, Any]:
        tree_path, layer = jtree.hf_param_path(params, name)
        dims = layer_dims(f"{tree_path}.weight", layer)
        out = {}
        for piece, value in pieces.items():
            if not hasattr(value, "ndim"):  # None, or a nested encoder (prompt methods)
                out[piece] = jax.tree.map(lambda _: PartitionSpec(), value)
                continue
            follows = axes_of.get(piece)
            if dims is None or follows is None or len(follows) != value.ndim:
                out[piece] = PartitionSpec()
                continue
            wanted = tuple(None if axis is None else dims[axis] for axis in follows)
            out[piece] = PartitionSpec(*fit_dims(wanted, value.shape, mesh))
        return out

    def override_spec(name: str, value: Any) -> Any:
        if value is None:
            return None
        tree_path, layer = jtree.hf_param_path(params, jtree.tied_head_source(params, name))
        dims = layer_dims(tree_path, layer)
        if dims is None or len(dims) != value.ndim:
            return PartitionSpec()
        return PartitionSpec(*fit_dims(dims, value.shape, mesh))

    return adapter.replace(
        weights={name: module_specs(name, pieces) for name, pieces in adapter.weights.items()},
        overrides={name: override_spec(name, v) for name, v in adapter.overrides.items()},
        frozen={name: module_specs(name, pieces) for name, pieces in adapter.frozen.items()},
    )
