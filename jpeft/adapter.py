"""The `Adapter` pytree: what every PEFT method's adapter is, and how it splits for training.

An adapter stores its arrays the way PEFT names them, per Hugging Face module:

    adapter.weights    {"model.layers.0.self_attn.q_proj": {"lora_A.weight": [r, in], ...}}
    adapter.overrides  {"lm_head.weight": [vocab, dim], "model.layers.0.mlp.up_proj.bias": [out]}
    adapter.frozen     {module: {piece: array}}: non-trainable state (PiSSA's initial factors);
                       under `SHARED` the state every module's node sees (VeRA's projections)
    adapter.config     the method's config: static, hashable

`weights` and `overrides` are trainable; `overrides` replace base leaves (PEFT's `modules_to_save`
copies and trainable biases). Prompt-learning adapters (prompt tuning, p-tuning, prefix tuning)
change no weight: they keep their encoder under `weights["prompt_encoder"]` and give the model a
`Prompt`. How an adapter reaches the model is `jpeft.injection`; what each method does is
`jpeft.method`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jpeft import tree as jtree
from jpeft.config import PeftConfig

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


# The `weights` key of a prompt-learning adapter's encoder (PEFT's `prompt_encoder` module).
PROMPT_ENCODER = "prompt_encoder"
# The `frozen` key of state shared by every adapted module (VeRA's `vera_A` / `vera_B`, which
# PEFT keeps once on the tuner, `base_model.vera_A`): each node gets it with its own frozen pieces.
SHARED = "base_model"


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
