"""The `Adapter` pytree and the functions on it: init, inject, merge, unmerge, partition.

An adapter stores its arrays the way PEFT names them, per Hugging Face module:

    adapter.weights    {"model.layers.0.self_attn.q_proj": {"lora_A.weight": [r, in], ...}}
    adapter.overrides  {"lm_head.weight": [vocab, dim], "model.layers.0.mlp.up_proj.bias": [out]}
    adapter.frozen     {module: {piece: array}}: non-trainable state (PiSSA's initial factors)
    adapter.config     the method's config: static, hashable

`weights` and `overrides` are trainable; `overrides` replace base leaves (PEFT's `modules_to_save`
copies and trainable biases). `inject(params, adapter)` turns this into the model's layout: for a
model that stacks its layers, per-layer pieces are stacked on a leading axis (zero-padded to the
largest rank, zeros for layers the adapter does not touch), so `lax.scan` slices them with the base
weights. Each method registers a `Method` that builds its per-module node.

Prompt-learning adapters (prompt tuning, p-tuning, prefix tuning) change no weight: they keep
their encoder under `weights["prompt_encoder"]` and give the model a `Prompt` (virtual token
embeddings or a per-layer key/value prefix) through `prompt_of`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as jtree
from jpeft.config import PeftConfig
from jpeft.quant.params import dequantize_params, requantize_like

Array = jax.Array
Pieces = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """What a prompt-learning adapter feeds the model, in the model's dtype.

    embeddings [T, D]: virtual token embeddings put before the input embeddings (prompt tuning,
        p-tuning); the model's outputs then cover the T virtual positions first, as PEFT's do.
    keys, values [L, K, T, hd]: a per-layer attention prefix over the K key/value heads (prefix
        tuning), seen by every real token; the real tokens' positions start at T.
    """

    embeddings: Array | None = None
    keys: Array | None = None
    values: Array | None = None

    @property
    def num_virtual_tokens(self) -> int:
        if self.embeddings is not None:
            return int(self.embeddings.shape[0])
        return int(self.keys.shape[2])


jax.tree_util.register_dataclass(
    Prompt, data_fields=["embeddings", "keys", "values"], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class Method:
    """What a PEFT method contributes; each file in `jpeft/methods/` registers one.

    init_adapter(params, config, key, model) -> Adapter

    Methods that change weights (LoRA, IA3) store pieces per module and give:
    piece_names: the PEFT names of their per-module pieces (`"lora_A.weight"`, `"ia3_l"`)
    make_node(base, pieces, frozen, constants, active, dropout_key, config) -> adapted weight
        where every array may carry a leading stacked-layer axis; `constants` are per-module
        scalars from `module_constants` ([L] when stacked), `active` a bool mask ([L]) of the
        layers that have the adapter, or None.
    module_constants(config, module_name, pieces) -> {name: float}
    check_shapes(config, module_name, base_shape, pieces) -> None, or ValueError naming both shapes
    piece_axes: {piece name: per piece axis, the base weight axis it runs along (0 = out,
        1 = in, HF orientation) or None}; sharding splits a piece as its base axis is split
        (LoRA's A [r, in] is (None, 1)); undeclared pieces are replicated
    to_saved(adapter) -> adapter: the form PEFT writes (LoRA: PiSSA/OLoRA as plain LoRA)
    from_saved(adapter, params, source) -> adapter: undo what PEFT's file leaves out

    Prompt-learning methods store their encoder under `PROMPT_ENCODER` and give:
    prompt(adapter, dropout_key) -> Prompt
    prompt_embeddings(adapter) -> [T, X]: what PEFT saves as `prompt_embeddings` (the encoder's
        output); a loaded adapter holds it as `embedding.weight` and uses it as is.
    """

    init_adapter: Callable[..., Adapter]
    piece_names: tuple[str, ...] = ()
    make_node: Callable[..., Any] | None = None
    module_constants: Callable[[PeftConfig, str, Pieces], dict[str, float]] | None = None
    check_shapes: Callable[[PeftConfig, str, tuple, Pieces], None] | None = None
    piece_axes: Mapping[str, tuple[int | None, ...]] = dataclasses.field(default_factory=dict)
    to_saved: Callable[[Adapter], Adapter] | None = None
    from_saved: Callable[[Adapter, Any, str], Adapter] | None = None
    prompt: Callable[[Adapter, Array | None], Prompt] | None = None
    prompt_embeddings: Callable[[Adapter], Array] | None = None

    @property
    def is_prompt_learning(self) -> bool:
        return self.prompt is not None


# The `weights` key of a prompt-learning adapter's encoder (PEFT's `prompt_encoder` module).
PROMPT_ENCODER = "prompt_encoder"

_METHODS: dict[str, Method] = {}


def register_method(peft_type: str, method: Method) -> None:
    """Register a method under its PEFT type name (e.g. "LORA")."""
    _METHODS[peft_type] = method


def method_for(config: PeftConfig) -> Method:
    import jpeft.methods  # noqa: F401  (registers every method)

    if config.peft_type not in _METHODS:
        raise ValueError(f"no jpeft method registered for peft_type {config.peft_type!r}")
    return _METHODS[config.peft_type]


@jax.tree_util.register_pytree_with_keys_class
class Adapter:
    """A PEFT adapter as a pytree: trainable `weights` and `overrides`, `frozen` state, config."""

    def __init__(
        self,
        config: PeftConfig,
        weights: Mapping[str, Pieces],
        overrides: Mapping[str, Array] | None = None,
        frozen: Mapping[str, Pieces] | None = None,
    ):
        self.config = config
        self.weights = dict(weights)
        self.overrides = dict(overrides or {})
        self.frozen = dict(frozen or {})

    def tree_flatten_with_keys(self):
        children = (
            (jax.tree_util.GetAttrKey("weights"), self.weights),
            (jax.tree_util.GetAttrKey("overrides"), self.overrides),
            (jax.tree_util.GetAttrKey("frozen"), self.frozen),
        )
        return children, self.config

    @classmethod
    def tree_unflatten(cls, config, children):
        adapter = object.__new__(cls)
        adapter.config = config
        adapter.weights, adapter.overrides, adapter.frozen = children
        return adapter

    def replace(self, **changes: Any) -> Adapter:
        fields = dict(
            config=self.config, weights=self.weights, overrides=self.overrides, frozen=self.frozen
        )
        fields.update(changes)
        return Adapter(**fields)

    def num_trainable(self) -> int:
        """Number of trainable scalars (weights + overrides)."""
        leaves = jax.tree.leaves((self.weights, self.overrides))
        return int(sum(np.prod(np.shape(leaf)) for leaf in leaves))

    def __repr__(self) -> str:
        return (
            f"Adapter({type(self.config).__name__}, {len(self.weights)} modules, "
            f"{len(self.overrides)} overrides, {self.num_trainable():,} trainable)"
        )


def is_trainable(path: str, leaf: Any) -> bool:
    """Default filter for `partition`: everything but an adapter's `frozen` state."""
    return not path.startswith("frozen")


def partition(tree: Any, keep: Callable[[str, Any], bool] = is_trainable) -> tuple[Any, Any]:
    """Split into (kept, rest) pytrees of the same structure; see `jpeft.tree.partition`."""
    return jtree.partition(tree, keep)


def prompt_of(adapter: Adapter | None, dropout_key: Array | None = None) -> Prompt | None:
    """The virtual tokens or attention prefix a prompt-learning adapter adds, else None."""
    if adapter is None:
        return None
    method = method_for(adapter.config)
    return method.prompt(adapter, dropout_key) if method.is_prompt_learning else None


def init_adapter(
    params: Mapping[str, Any], config: PeftConfig, *, key: Array, model: Any = None
) -> Adapter:
    """A fresh adapter for `params` (stacked or per-layer HF trees), initialised as PEFT does."""
    return method_for(config).init_adapter(params, config, key, model)


# Modules that sit after the decoder layers: an adapter there needs no gradient through them.
OUTPUT_SIDE = ("lm_head", "model.norm")


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


def inject(params: Mapping[str, Any], adapter: Adapter, *, dropout_key: Array | None = None):
    """`params` with targeted weights replaced by adapted-weight nodes and overrides applied.

    Pure and cheap (only adapter-sized arrays are built); call it inside the jitted, differentiated
    function so gradients flow to the adapter's leaves.
    """
    method = method_for(adapter.config)
    out = _apply_overrides(params, adapter.overrides)
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


def _make_node(method: Method, adapter: Adapter, base, layer_names, num_layers, dropout_key):
    config = adapter.config
    if num_layers is None:
        name = layer_names[None]
        pieces = adapter.weights[name]
        method.check_shapes(config, name, jtree.leaf_shape(base), pieces)
        constants = {
            k: jnp.float32(v) for k, v in method.module_constants(config, name, pieces).items()
        }
        return method.make_node(
            base, pieces, adapter.frozen.get(name, {}), constants, None, dropout_key, config
        )
    for layer, name in layer_names.items():
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"adapter module {name!r}: layer {layer} does not exist, the model has "
                f"{num_layers} layers"
            )
        method.check_shapes(config, name, jtree.leaf_shape(base)[1:], adapter.weights[name])
    pieces = _stack_layers(adapter.weights, layer_names, num_layers)
    frozen = _stack_layers(adapter.frozen, layer_names, num_layers)
    constants = _stack_constants(method, config, adapter.weights, layer_names, num_layers)
    active = np.zeros(num_layers, bool)
    active[list(layer_names)] = True
    keys = None if dropout_key is None else jax.random.split(dropout_key, num_layers)
    return method.make_node(base, pieces, frozen, constants, jnp.asarray(active), keys, config)


def _stack_layers(per_module: Mapping[str, Pieces], layer_names, num_layers) -> Pieces:
    """Stack each piece over layers: [L, *max shape], zero-padded, zeros where absent."""
    present = [per_module[name] for name in layer_names.values() if name in per_module]
    if not present:
        return {}
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


def _stack_constants(method, config, weights, layer_names, num_layers) -> dict[str, Array]:
    values: dict[str, np.ndarray] = {}
    for layer, name in layer_names.items():
        for key, value in method.module_constants(config, name, weights[name]).items():
            values.setdefault(key, np.zeros(num_layers, np.float32))[layer] = value
    return {key: jnp.asarray(value) for key, value in values.items()}


def _apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Array]):
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

    Overrides (modules_to_save, trained biases) cannot be undone from merged params alone and
    are left as they are.
    """
    _check_mergeable(adapter, "unmerge")
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
    from jpeft.ops import AdaptedWeight

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
