"""Training helpers: the causal-LM loss, optax masks, and a jitted train-step builder.

The step differentiates a function of the trainable adapter leaves only: the base params and the
adapter's frozen state are plain arguments, so no weight-sized gradient is ever formed and the
optimizer state scales with the adapter, not the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jpeft.adapter import Adapter, is_trainable
from jpeft.sharding.activations import traced_on
from jpeft.sharding.placement import StepShardings
from jpeft.tree import combine, partition, path_str

IGNORE_INDEX = -100


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token cross entropy, as transformers computes it.

    logits [batch, seq, vocab]; labels [batch, seq] aligned with the inputs (shifted here),
    IGNORE_INDEX (-100) where no loss is wanted. The labels are shifted rather than the logits
    (the last position gets IGNORE_INDEX), so the [batch, seq, vocab] logits are never sliced.
    """
    ignore = jnp.full_like(labels[:, :1], IGNORE_INDEX)
    targets = jnp.concatenate([labels[:, 1:], ignore], axis=1)
    valid = targets != IGNORE_INDEX
    weights = valid / jnp.maximum(jnp.sum(valid), 1)
    return _weighted_nll(logits, jnp.where(valid, targets, 0), weights.astype(jnp.float32))


@jax.custom_vjp
def _weighted_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(weights * -log_softmax(logits)[targets]): logits [B, S, V], targets/weights [B, S].

    Computed as logsumexp - picked logit in float32; the backward is the single elementwise pass
    weights * (softmax - onehot), with no [B, S, V] log-softmax kept and no scatter.
    """
    return _weighted_nll_fwd(logits, targets, weights)[0]


def _weighted_nll_fwd(logits, targets, weights):
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)  # [B, S]
    picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(weights * (lse - picked)), (logits, targets, weights, lse)


def _weighted_nll_bwd(residuals, grad):
    logits, targets, weights, lse = residuals
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    grad_logits = (grad * weights)[..., None] * (probs - onehot)
    # None: labels and their weights get no gradient.
    return grad_logits.astype(logits.dtype), None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def with_virtual_labels(labels: jax.Array, num_positions: int) -> jax.Array:
    """`labels` [B, S] padded in front with IGNORE_INDEX to `num_positions` [B, P]: the virtual
    tokens a prompt-tuning or p-tuning adapter puts first get no loss, as in PEFT."""
    extra = num_positions - labels.shape[1]
    if extra <= 0:
        return labels
    ignored = jnp.full((labels.shape[0], extra), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([ignored, labels], axis=1)


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
    *,
    shardings: StepShardings | None = None,
    remat: str | None = None,
) -> Callable:
    """A jitted train step `step(params, adapter, opt_state, batch, dropout_key)`.

    It returns `(adapter, opt_state, loss)`.
    `batch` holds `input_ids` [batch, seq], `labels` [batch, seq] and optionally `attention_mask`;
    the labels of a prompt adapter's virtual tokens are added here.
    `opt_state` is `optimizer.init(trainable)` with `trainable, _ = jpeft.partition(adapter)`.
    The adapter and optimizer state are donated.

    shardings: from `jpeft.sharding.step_shardings(mesh, params, adapter, optimizer)`: the step is
        compiled with those `in_shardings`/`out_shardings` (the batch split over data x fsdp,
        the loss replicated). remat: per-layer activation checkpointing, "dots" or "full".
    """
    if remat is not None:
        model = dataclasses.replace(model, remat=remat)

    def loss_of(trainable: Adapter, frozen: Adapter, params, batch, dropout_key):
        adapter = combine(trainable, frozen)
        logits = model.apply(
            params,
            batch["input_ids"],
            adapter=adapter,
            attention_mask=batch.get("attention_mask"),
            dropout_key=dropout_key,
        )
        return loss_fn(logits, with_virtual_labels(batch["labels"], logits.shape[1]))

    def step(params, adapter: Adapter, opt_state, batch, dropout_key=None):
        trainable, frozen = partition(adapter, is_trainable)
        loss, grads = jax.value_and_grad(loss_of)(trainable, frozen, params, batch, dropout_key)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return combine(trainable, frozen), opt_state, loss

    if shardings is None:
        return jax.jit(step, donate_argnums=(1, 2))
    s = shardings
    return jax.jit(
        traced_on(s.mesh, step),
        in_shardings=(s.params, s.adapter, s.opt_state, s.batch, s.replicated),
        out_shardings=(s.adapter, s.opt_state, s.replicated),
        donate_argnums=(1, 2),
    )
