"""Training helpers: the causal-LM loss, optax masks, and a jitted train-step builder.

The step differentiates a function of the trainable adapter leaves only: the base params and the
adapter's frozen state are plain arguments, so no weight-sized gradient is ever formed and the
optimizer state scales with the adapter, not the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jpeft.adapter import Adapter, is_trainable
from jpeft.tree import combine, partition, path_str

IGNORE_INDEX = -100


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token cross entropy, as transformers computes it.

    logits [batch, seq, vocab]; labels [batch, seq] aligned with the inputs (shifted here),
    IGNORE_INDEX (-100) where no loss is wanted.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def trainable_mask(tree: Any, keep: Callable[[str, Any], bool] = is_trainable) -> Any:
    """A pytree of bools, True at the leaves `keep(path, leaf)` selects (for `optax.masked`)."""
    return jax.tree_util.tree_map_with_path(lambda p, leaf: keep(path_str(p), leaf), tree)


def optax_mask(
    optimizer: optax.GradientTransformation,
    tree: Any,
    keep: Callable[[str, Any], bool] = is_trainable,
) -> optax.GradientTransformation:
    """`optimizer` on the selected leaves and zero updates elsewhere, for loops that keep one tree.

    Use it when you differentiate a single tree (an adapter with frozen state, or params plus
    adapter): the frozen leaves then never move, and carry no optimizer state.
    """
    labels = jax.tree_util.tree_map_with_path(
        lambda p, leaf: "train" if keep(path_str(p), leaf) else "frozen", tree
    )
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def make_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = causal_lm_loss,
) -> Callable:
    """A jitted `step(params, adapter, opt_state, batch, dropout_key) -> (adapter, opt_state, loss)`.

    `batch` holds `input_ids` [batch, seq], `labels` [batch, seq] and optionally `attention_mask`.
    `opt_state` is `optimizer.init(trainable)` with `trainable, _ = jpeft.partition(adapter)`.
    The adapter and optimizer state are donated.
    """

    def loss_of(trainable: Adapter, frozen: Adapter, params, batch, dropout_key):
        adapter = combine(trainable, frozen)
        logits = model.apply(
            params,
            batch["input_ids"],
            adapter=adapter,
            attention_mask=batch.get("attention_mask"),
            dropout_key=dropout_key,
        )
        return loss_fn(logits, batch["labels"])

    def step(params, adapter: Adapter, opt_state, batch, dropout_key=None):
        trainable, frozen = partition(adapter, is_trainable)
        loss, grads = jax.value_and_grad(loss_of)(trainable, frozen, params, batch, dropout_key)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return combine(trainable, frozen), opt_state, loss

    return jax.jit(step, donate_argnums=(1, 2))
