"""Param-tree paths, the per-layer Hugging Face view of stacked layers, partition and combine.

Params are nested dicts whose dotted paths are Hugging Face parameter names. A model that scans over
its decoder layers stores them stacked: every leaf under a dict keyed `"layers"` whose children are
not numbered carries the layer index on its leading axis, so `model.layers.self_attn.q_proj.weight`
[L, out, in] stands for the HF tensors `model.layers.{i}.self_attn.q_proj.weight` [out, in].
`hf_modules` gives the per-layer view that targeting and PEFT files use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import jax
import numpy as np

STACKED_KEY = "layers"

# Module names that hold an embedding table rather than a linear layer (PEFT wraps those in
# lora.Embedding). Used when the params alone must tell a table from a projection.
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted path: leaf}; non-dict values (arrays, adapted weights) are leaves."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{dotted path: leaf} -> nested dict; the inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    """The value at dotted `path`; KeyError naming the missing part."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"no entry {part!r} on the way to {path!r}")
        node = node[part]
    return node


def set_path(tree: Mapping[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `tree` with `path` set to `value`; only the dicts on the path are copied."""
    head, _, rest = path.partition(".")
    new = dict(tree)
    new[head] = set_path(tree.get(head, {}), rest, value) if rest else value
    return new


def _is_stacked_container(key: str, node: Any) -> bool:
    return key == STACKED_KEY and isinstance(node, Mapping) and not all(k.isdigit() for k in node)


def num_stacked_layers(tree: Mapping[str, Any]) -> int | None:
    """Number of layers stacked under the `layers` container, or None for an unstacked tree."""
    for key, node in _walk_containers(tree):
        if _is_stacked_container(key, node):
            first = next(iter(flatten(node).values()))
            return int(first.shape[0])
    return None


def _walk_containers(tree: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for key, node in tree.items():
        if isinstance(node, Mapping):
            yield key, node
            yield from _walk_containers(node)


@dataclasses.dataclass(frozen=True)
class ModuleRef:
    """One Hugging Face module as seen through a (possibly stacked) param tree.

    `name` is the HF module path (`model.layers.3.self_attn.q_proj`); `tree_path` the module's path
    in the param tree (`model.layers.self_attn.q_proj`); `layer` the index on the stacked axis, or
    None for modules outside a stacked container.
    """

    name: str
    tree_path: str
    layer: int | None
    kind: str  # "linear" or "embedding"
    shape: tuple[int, ...]  # the per-layer weight shape, [out, in] or [vocab, dim]


def hf_modules(params: Mapping[str, Any]) -> list[ModuleRef]:
    """Every module with a 2-D weight, in the per-layer HF view, in param-tree order."""
    refs: list[ModuleRef] = []
    for path, leaf in flatten(params).items():
        if not path.endswith(".weight"):
            continue
        tree_path = path[: -len(".weight")]
        parts = tree_path.split(".")
        stacked_at = _stacked_position(params, parts)
        shape = leaf_shape(leaf)
        kind = module_kind(params, tree_path)
        if stacked_at is None:
            if len(shape) == 2:
                refs.append(ModuleRef(tree_path, tree_path, None, kind, shape))
            continue
        if len(shape) != 3:
            continue
        for layer in range(shape[0]):
            name = ".".join(parts[: stacked_at + 1] + [str(layer)] + parts[stacked_at + 1 :])
            refs.append(ModuleRef(name, tree_path, layer, kind, shape[1:]))
    return refs


class ModelView(dict):
    """A param tree in the per-layer HF view of a model jpeft did not write (`jpeft.flax`): it
    names the modules that are embedding tables and the output head ("all-linear" leaves it
    out), which module names alone cannot tell."""

    def __init__(
        self,
        tree: Mapping[str, Any],
        embeddings: Collection[str] = (),
        output_heads: Collection[str] = (),
    ):
        super().__init__(tree)
        self.embeddings = frozenset(embeddings)
        self.output_heads = frozenset(output_heads)


def module_kind(params: Mapping[str, Any], module: str) -> str:
    """ "embedding" for an embedding table's module, else "linear"."""
    if module in getattr(params, "embeddings", ()) or module.split(".")[-1] in EMBEDDING_NAMES:
        return "embedding"
    return "linear"


TIED_HEAD, TIED_TABLE = "lm_head.weight", "model.embed_tokens.weight"


def tied_head_source(params: Mapping[str, Any], name: str) -> str:
    """The leaf that holds `name`: the embedding table for the head of a tied-embedding model."""
    if name == TIED_HEAD and "lm_head" not in params:
        return TIED_TABLE
    return name


def hf_leaf_names(params: Mapping[str, Any]) -> list[str]:
    """Every parameter name in the per-layer HF view (`model.layers.3.mlp.up_proj.bias`).

    A model with tied embeddings lists `lm_head.weight` too: PEFT sees a head module whose weight
    is shared with the table, and `modules_to_save=["lm_head"]` unties a trainable copy of it.
    """
    names = []
    if tied_head_source(params, TIED_HEAD) != TIED_HEAD and TIED_TABLE in flatten(params):
        names.append(TIED_HEAD)
    for path, leaf in flatten(params).items():
        parts = path.split(".")
        stacked_at = _stacked_position(params, parts)
        if stacked_at is None:
            names.append(path)
            continue
        for layer in range(leaf_shape(leaf)[0]):
            names.append(".".join(parts[: stacked_at + 1] + [str(layer)] + parts[stacked_at + 1 :]))
    return names


def is_stacked_leaf(params: Mapping[str, Any], path: str) -> bool:
    """Whether the leaf at dotted `path` lies in a stacked container (layer index on axis 0)."""
    return _stacked_position(params, path.split(".")) is not None


def _stacked_position(params: Mapping[str, Any], parts: list[str]) -> int | None:
    node: Any = params
    for i, part in enumerate(parts):
        if _is_stacked_container(part, node.get(part) if isinstance(node, Mapping) else None):
            return i
        node = node.get(part) if isinstance(node, Mapping) else None
    return None


def leaf_shape(leaf: Any) -> tuple[int, ...]:
    """The shape of a param leaf: an array, a quantized weight, or an adapted node's base."""
    # (a numpy array's own `.base` is the buffer it views, not an adapted node's base weight)
    base = leaf if isinstance(leaf, np.ndarray) else getattr(leaf, "base", leaf)
    return tuple(base.shape) if hasattr(base, "shape") else tuple(np.shape(base))


def layer_of(leaf: Any, layer: int | None) -> Any:
    """One layer's slice of a stacked leaf (an array or a quantized weight); `leaf` if None."""
    if layer is None:
        return leaf
    return jax.tree.map(lambda a: a[layer], leaf)


def hf_param_path(params: Mapping[str, Any], hf_name: str) -> tuple[str, int | None]:
    """HF parameter name -> (param-tree path, layer index on the stacked axis or None)."""
    parts = hf_name.split(".")
    node: Any = params
    for i, part in enumerate(parts):
        if isinstance(node, Mapping) and _is_stacked_container(part, node.get(part)):
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                return ".".join(parts[: i + 1] + parts[i + 2 :]), int(parts[i + 1])
        node = node.get(part) if isinstance(node, Mapping) else None
    return hf_name, None


# ---------------------------------------------------------------------------------------------
# partition / combine, in the spirit of equinox.partition


def partition(tree: Any, keep: Callable[[str, Any], bool]) -> tuple[Any, Any]:
    """Split a pytree in two of the same structure: leaves where `keep(path, leaf)` and the rest.

    `path` is the leaf's key path with dots (`weights.model.layers.0.q_proj.lora_A.weight`).
    The leaves that go to the other side are replaced by None, so `combine(a, b)` restores the tree
    and `jax.grad` of a function of `a` differentiates only the kept leaves.
    """
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    kept, rest = [], []
    for key_path, leaf in leaves_with_paths:
        take = keep(path_str(key_path), leaf)
        kept.append(leaf if take else None)
        rest.append(None if take else leaf)
    return treedef.unflatten(kept), treedef.unflatten(rest)


def combine(*trees: Any) -> Any:
    """Merge trees made by `partition`: each leaf comes from the first tree where it is not None."""

    def first(*leaves):
        return next((leaf for leaf in leaves if leaf is not None), None)

    return jax.tree.map(first, *trees, is_leaf=lambda x: x is None)


def path_str(key_path: tuple) -> str:
    """A JAX key path as a dotted string: `('a', 0, 'b')` keys -> `a.0.b`."""
    parts = []
    for key in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)
