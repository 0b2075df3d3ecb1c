"""Putting an adapter into a model: init, inject, prepare, merge, unmerge.

`inject(params, adapter)` turns an adapter into the model's layout: each targeted weight becomes
its method's node (base weight + pieces, see `jpeft.method.WeightMethod.make_node`); for a model
that stacks its layers, per-layer pieces are stacked on a leading axis (zero-padded to the largest
rank, zeros for layers the adapter does not touch), so `lax.scan` slices them with the base
weights. `prepare` is the one call a model makes: injected params, the prompt of a
prompt-learning adapter, and how many leading layers need no backward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as jtree
from jpeft.adapter import SHARED, Adapter, Prompt
from jpeft.config import PeftConfig
from jpeft.method import WeightMethod, method_for
from jpeft.ops import AdaptedWeight
from jpeft.quant.params import dequantize_params, requantize_like

Array = jax.Array
Pieces = dict[str, Array]

# Modules that sit after the decoder layers: an adapter there needs no gradient through them.
OUTPUT_SIDE = ("lm_head", "model.norm")


def init_adapter(
    params: Mapping[str, Any], config: PeftConfig, *, key: Array, model: Any = None
) -> Adapter:
    """A fresh adapter for `params` (stacked or per-layer HF trees), initialised as PEFT does."""
    return method_for(config).init_adapter(params, config, key, model)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a model needs from an adapter for one forward pass (see `prepare`).

    params: the params with adapted-weight nodes and overrides in place; prompt: the virtual
    tokens or prefix of a prompt-learning adapter, else None; untouched_layers: how many leading
    stacked layers no trainable leaf lies in or below (they need no backward pass).
    """

    params: Any
    prompt: Prompt | None
    untouched_layers: int


def prepare(
    params: Mapping[str, Any], adapter: Adapter | None, dropout_key: Array | None = None
) -> Prepared:
    """The one call a model makes with its `adapter` argument (None: the params as they are).

    An adapter type with a `prepared(params, dropout_key)` method prepares itself (the
    mixed-adapter bank of `jpeft.mixed`)."""
    if adapter is None:
        return Prepared(params, None, 0)
    own = getattr(type(adapter), "prepared", None)
    if own is not None:
        return own(adapter, params, dropout_key)
    return Prepared(
        inject(params, adapter, dropout_key=dropout_key),
        prompt_of(adapter, dropout_key),
        untouched_layers(params, adapter),
    )


def prompt_of(adapter: Adapter | None, dropout_key: Array | None = None) -> Prompt | None:
    """The virtual tokens or attention prefix a prompt-learning adapter adds, else None."""
    if adapter is None:
        return None
    method = method_for(adapter.config)
    return method.prompt(adapter, dropout_key) if method.is_prompt_learning else None


def untouched_layers(params: Mapping[str, Any], adapter: Adapter | None) -> int:
    """How many leading stacked layers the adapter leaves as they are.

    A model runs those layers without a backward pass: no trainable leaf lies below them.
    0 for unstacked params, no adapter, or an adapter on the embeddings or inputs (prompts).
    """
    num_layers = jtree.num_stacked_layers(params)
    if adapter is None or num_layers is None or method_for(adapter.config).is_prompt_learning:
        return 0
    first = num_layers
    for name in [*adapter.weights, *adapter.overrides]:
        tree_path, layer = jtree.hf_param_path(params, name)
        if layer is not None:
            first = min(first, layer)
        elif not tree_path.startswith(OUTPUT_SIDE):
            return 0
    return first


# ---------------------------------------------------------------------------------------------
# inject: the adapter in the model's layout


def inject(
    params: Mapping[str, Any],
    adapter: Adapter,
    *,
    dropout_key: Array | None = None,
    method: WeightMethod | None = None,
):
    """`params` with targeted weights replaced by adapted-weight nodes and overrides applied.

    Pure and cheap (only adapter-sized arrays are built); call it inside the jitted, differentiated
    function so gradients flow to the adapter's leaves. `method` builds the nodes (default: the
    config's registered method; `jpeft.mixed` passes its bank's).
    """
    method = method or method_for(adapter.config)
    out = apply_overrides(params, adapter.overrides)
    if method.is_prompt_learning:
        return out
    groups = _group_by_tree_path(params, adapter.weights)
    for index, (tree_path, layer_names) in enumerate(sorted(groups.items())):
        weight_path = f"{tree_path}.weight"
        base = _get_leaf(params, weight_path, next(iter(layer_names.values())))
        num_layers = None if None in layer_names else int(base.shape[0])
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        node = _make_node(method, adapter, base, layer_names, num_layers, key)
        out = jtree.set_path(out, weight_path, node)
    return out


def _get_leaf(params: Mapping[str, Any], path: str, module_name: str) -> Any:
    try:
        return jtree.get_path(params, path)
    except KeyError:
        raise ValueError(
            f"adapter module {module_name!r} has no weight in the params ({path!r} not found); "
            "was the adapter made for another model?"
        ) from None


def _group_by_tree_path(params, weights) -> dict[str, dict[int | None, str]]:
    """{tree path: {layer index or None: HF module name}} for the adapter's modules."""
    groups: dict[str, dict[int | None, str]] = {}
    for name in weights:
        tree_path, layer = jtree.hf_param_path(params, name)
        groups.setdefault(tree_path, {})[layer] = name
    return groups


def _make_node(method: WeightMethod, adapter: Adapter, base, layer_names, num_layers, dropout_key):
    inputs = node_inputs(method, adapter, jtree.leaf_shape(base), layer_names, num_layers)
    keys = dropout_key
    if dropout_key is not None and num_layers is not None:
        keys = jax.random.split(dropout_key, num_layers)
    return method.make_node(base, *inputs, keys, adapter.config)


def node_inputs(
    method: WeightMethod,
    adapter: Adapter,
    base_shape: tuple[int, ...],
    layer_names: Mapping[int | None, str],
    num_layers: int | None,
) -> tuple[Pieces, Pieces, dict[str, Array], Array | None]:
    """(pieces, frozen, constants, active) of `make_node` for one base weight of `base_shape`.

    `layer_names` maps a layer index to the adapter's module name there ({None: name} for an
    unstacked weight); a stacked weight ([L, out, in], `num_layers` L) gets its pieces stacked
    (`stack_layers`), its constants per layer and the mask of the layers the adapter has.
    """
    config = adapter.config
    shared = adapter.frozen.get(SHARED, {})  # not stacked: the same arrays for every layer
    if num_layers is None:
        name = layer_names[None]
        pieces = adapter.weights[name]
        method.check_shapes(config, name, tuple(base_shape), pieces)
        constants = {
            k: jnp.float32(v) for k, v in method.module_constants(config, name, pieces).items()
        }
        return pieces, {**shared, **adapter.frozen.get(name, {})}, constants, None
    for layer, name in layer_names.items():
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"adapter module {name!r}: layer {layer} does not exist, the model has "
                f"{num_layers} layers"
            )
        method.check_shapes(config, name, tuple(base_shape[1:]), adapter.weights[name])
    pieces = stack_layers(adapter.weights, layer_names, num_layers)
    frozen = {**shared, **stack_layers(adapter.frozen, layer_names, num_layers)}
    constants = _stack_constants(method, config, adapter.weights, layer_names, num_layers)
    active = np.zeros(num_layers, bool)
    active[list(layer_names)] = True
    return pieces, frozen, constants, jnp.asarray(active)


def stack_layers(per_module: Mapping[str, Pieces], layer_names, num_layers) -> Pieces:
    """Stack each piece over layers: [L, *max shape], zero-padded, zeros where absent."""
    present = [per_module[name] for name in layer_names.values() if name in per_module]
    if not present:
        return {}
    _check_same_pieces(per_module, layer_names)
    stacked = {}
    for piece in present[0]:
        shapes = [np.shape(p[piece]) for p in present]
        full = tuple(max(dims) for dims in zip(*shapes, strict=True))
        dtype = present[0][piece].dtype
        rows = []
        for layer in range(num_layers):
            name = layer_names.get(layer)
            if name is None or name not in per_module:
                rows.append(jnp.zeros(full, dtype))
                continue
            value = per_module[name][piece]
            pad = [(0, f - s) for f, s in zip(full, np.shape(value), strict=True)]
            rows.append(jnp.pad(value, pad) if any(p[1] for p in pad) else value)
        stacked[piece] = jnp.stack(rows)
    return stacked


def _check_same_pieces(per_module: Mapping[str, Pieces], layer_names) -> None:
    """ValueError naming the layers when one stacked module has different piece names in
    different layers (LoKr with a full factor in some layers and a factored one in others)."""
    kinds: dict[tuple[str, ...], list[str]] = {}
    for name in layer_names.values():
        if name in per_module:
            kinds.setdefault(tuple(sorted(per_module[name])), []).append(name)
    if len(kinds) > 1:
        shown = "; ".join(f"{list(pieces)} in {names}" for pieces, names in kinds.items())
        raise ValueError(
            f"the layers of one stacked module hold different adapter pieces ({shown}); jpeft "
            "runs a module's stacked layers as one op, so every layer needs the same pieces "
            "(for LoKr, choose r and rank_pattern so the factors are full or factored alike)"
        )


def _stack_constants(method, config, weights, layer_names, num_layers) -> dict[str, Array]:
    values: dict[str, np.ndarray] = {}
    for layer, name in layer_names.items():
        for key, value in method.module_constants(config, name, weights[name]).items():
            values.setdefault(key, np.zeros(num_layers, np.float32))[layer] = value
    return {key: jnp.asarray(value) for key, value in values.items()}


def apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Array]):
    """`params` with each override (`Adapter.overrides`, by HF parameter name) in place."""
    out = params
    for name, value in overrides.items():
        tree_path, layer = jtree.hf_param_path(params, name)
        source = _get_leaf(out, jtree.tied_head_source(out, tree_path), name)
        expected = source.shape if layer is None else source.shape[1:]
        if tuple(value.shape) != tuple(expected):
            raise ValueError(
                f"adapter override {name!r} has shape {tuple(value.shape)} but the model's "
                f"parameter has shape {tuple(expected)}"
            )
        value = value.astype(source.dtype)
        out = jtree.set_path(
            out, tree_path, value if layer is None else source.at[layer].set(value)
        )
    return out


# ---------------------------------------------------------------------------------------------
# merge / unmerge


def merge(
    params: Mapping[str, Any], adapter: Adapter, *, requantize: bool = False
) -> dict[str, Any]:
    """PEFT's `merge_and_unload`: a plain param tree with the adapter folded into the weights.

    A node may also change its module's bias (IA3 scales the bias of an output-scaled module).

    4-bit quantized weights (QLoRA) are dequantized, each to the dtype it was quantized from, and
    the result is a float tree by default: quantizing a merged weight again rounds it to the
    4-bit grid anew, an error as large as a small fine-tune's change, so the adapter's effect
    can be lost. With `requantize=True` the merged weights are quantized again in their format
    (for a 4-bit checkpoint, accepting that error) and the untouched ones are kept as they were.
    """
    _check_mergeable(adapter, "merge")
    injected = inject(dequantize_params(params), adapter)
    merged = _map_modules(injected, "merged_weight", "merged_bias")
    if not requantize:
        return merged
    targeted = {f"{path}.weight" for path in _group_by_tree_path(params, adapter.weights)}
    return requantize_like(merged, params, targeted)


def unmerge(merged: Mapping[str, Any], adapter: Adapter) -> dict[str, Any]:
    """Undo `merge` for methods whose merge is invertible (LoRA, IA3): the original weights.
    A method whose merge swaps in its own copies (LN tuning) refuses.

    Overrides (modules_to_save, trained biases) cannot be undone from merged params alone and
    are left as they are.
    """
    _check_mergeable(adapter, "unmerge")
    if not method_for(adapter.config).merge_is_invertible:
        raise ValueError(
            f"cannot unmerge a {adapter.config.peft_type} adapter: its merge replaces base "
            "weights by the adapter's trained copies, so the merged params no longer hold the "
            "originals; keep the params you merged into (jpeft.merge leaves them as they were)"
        )
    injected = inject(merged, adapter.replace(overrides={}))
    return _map_modules(injected, "unmerged_weight", "unmerged_bias")


def _check_mergeable(adapter: Adapter, what: str) -> None:
    if method_for(adapter.config).is_prompt_learning:
        raise ValueError(
            f"cannot {what} a {adapter.config.peft_type} adapter: prompt-learning methods add "
            "virtual tokens or an attention prefix, not a weight change (PEFT cannot merge them "
            "either); pass the adapter to model.apply / model.generate instead"
        )


def _map_modules(tree: Mapping[str, Any], weight_fn: str, bias_fn: str) -> dict[str, Any]:
    """Replace every adapted-weight node by `node.<weight_fn>()`, and its sibling bias by
    `node.<bias_fn>(bias)` where the node defines that method."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _map_modules(value, weight_fn, bias_fn)
        elif isinstance(value, AdaptedWeight):
            out[key] = getattr(value, weight_fn)()
        else:
            out[key] = value
    node = tree.get("weight")
    if isinstance(node, AdaptedWeight) and "bias" in tree and hasattr(node, bias_fn):
        out["bias"] = getattr(node, bias_fn)(tree["bias"])
    return out
