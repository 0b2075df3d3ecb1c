"""Training: the losses, optax masks, and the jitted train step (`jpeft finetune` runs it too).

The step differentiates a function of the trainable adapter leaves only: the base params and the
adapter's frozen state are plain arguments, so no weight-sized gradient is ever formed and the
optimizer state scales with the adapter, not the model. What a method adds to training comes
from its registry entry: a loss term (`regularizer`, AdaLoRA's orthogonality) and an optimizer
wrapper (`wrap_optimizer`, AdaLoRA's rank allocator), so the step is the same for every method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jpeft.activations import traced_on
from jpeft.adapter import Adapter, is_trainable
from jpeft.method import method_for, optimizer_for
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


# An objective: (model, params, adapter, batch, dropout_key) -> scalar loss.
Objective = Callable[[Any, Any, Adapter, dict, jax.Array | None], jax.Array]


def causal_lm_objective(model, params, adapter: Adapter, batch: dict, dropout_key) -> jax.Array:
    """`causal_lm_loss` of the full logits: batch `input_ids` [B, S], `labels` [B, S] (-100: no
    loss), optional `attention_mask` [B, S]; a prompt adapter's virtual tokens get no loss."""
    logits = model.apply(
        params,
        batch["input_ids"],
        adapter=adapter,
        attention_mask=batch.get("attention_mask"),
        dropout_key=dropout_key,
    )
    return causal_lm_loss(logits, with_virtual_labels(batch["labels"], logits.shape[1]))


def answer_objective(model, params, adapter: Adapter, batch: dict, dropout_key) -> jax.Array:
    """Mean cross entropy at chosen positions, the LM head run there only (not over [B, S, V]).

    batch: `input_ids` [B, S]; `positions` [B, A], the positions whose next token is scored
    (counted in the real tokens: a prompt adapter's virtual tokens are added here); `targets`
    [B, A] those next tokens; `valid` [B, A] bool, which of them count.
    """
    hidden = model.hidden_states(
        params, batch["input_ids"], adapter=adapter, dropout_key=dropout_key
    )
    positions = batch["positions"] + (hidden.shape[1] - batch["input_ids"].shape[1])
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    logits = model.logits(params, picked, adapter=adapter).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(batch["valid"], nll, 0.0)) / jnp.maximum(batch["valid"].sum(), 1)


def init_opt_state(optimizer: optax.GradientTransformation, trainable: Adapter) -> Any:
    """The optimizer state `make_train_step` expects: `optimizer.init(trainable)`, through the
    method's optimizer wrapper (AdaLoRA keeps its rank allocator's state there)."""
    return optimizer_for(optimizer, trainable).init(trainable)


def finish(adapter: Adapter, opt_state: Any) -> Adapter:
    """The adapter to save after training with `opt_state`: the method's `finish_training`
    (AdaLoRA: its pruned ranks as the config's `rank_pattern`), the adapter itself for most."""
    return method_for(adapter.config).finish_training(adapter, opt_state)


def make_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    objective: Objective = causal_lm_objective,
    *,
    shardings: StepShardings | None = None,
    remat: str | None = None,
) -> Callable:
    """A jitted train step `step(params, adapter, opt_state, batch, dropout_key)`.

    It returns `(adapter, opt_state, loss)`; the loss includes the method's regularizer. A step
    whose loss or gradient is not finite (NaN or inf) changes nothing: it returns the adapter and
    optimizer state it was given and a NaN loss, so a loop that stops on a NaN loss keeps the
    last good state (`jpeft finetune` does).
    `batch` is what `objective` reads (default `causal_lm_objective`: `input_ids` [batch, seq],
    `labels` [batch, seq], optional `attention_mask`). `opt_state` is
    `init_opt_state(optimizer, trainable)` with `trainable, _ = jpeft.partition(adapter)` (for
    most methods that is `optimizer.init(trainable)`). The adapter and optimizer state are
    donated. `dropout_key`: a PRNG key, an integer seed (such as the step index: on a multi-host
    mesh it needs no placing) or None (no dropout).

    shardings: from `jpeft.sharding.step_shardings(mesh, params, adapter, optimizer)`: the step is
        compiled with those `in_shardings`/`out_shardings` (the batch split over data x fsdp,
        the loss replicated). remat: per-layer activation checkpointing, "dots" or "full".
    """
    if remat is not None:
        model = dataclasses.replace(model, remat=remat)

    def loss_of(trainable: Adapter, frozen: Adapter, params, batch, dropout_key):
        adapter = combine(trainable, frozen)
        loss = objective(model, params, adapter, batch, dropout_key)
        extra = method_for(adapter.config).regularizer(adapter)
        return loss if extra is None else loss + extra

    def step(params, adapter: Adapter, opt_state, batch, dropout_key=None):
        if dropout_key is not None and not jax.dtypes.issubdtype(
            dropout_key.dtype, jax.dtypes.prng_key
        ):
            dropout_key = jax.random.key(dropout_key)
        trainable, frozen = partition(adapter, is_trainable)
        adapter_optimizer = optimizer_for(optimizer, adapter)
        _check_opt_state(adapter_optimizer, trainable, opt_state)
        loss, grads = jax.value_and_grad(loss_of)(trainable, frozen, params, batch, dropout_key)
        updates, new_opt_state = adapter_optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
        trainable, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (new_trainable, new_opt_state),
            (trainable, opt_state),
        )
        return combine(trainable, frozen), opt_state, jnp.where(finite, loss, jnp.nan)

    if shardings is None:
        return jax.jit(step, donate_argnums=(1, 2))
    s = shardings
    return jax.jit(
        traced_on(s.mesh, step),
        in_shardings=(s.params, s.adapter, s.opt_state, s.batch, s.replicated),
        out_shardings=(s.adapter, s.opt_state, s.replicated),
        donate_argnums=(1, 2),
    )


def _check_opt_state(optimizer: optax.GradientTransformation, trainable: Adapter, opt_state):
    """ValueError when `opt_state` is not the state of the adapter's optimizer (at trace time)."""
    expected = jax.tree.structure(jax.eval_shape(optimizer.init, trainable))
    if jax.tree.structure(opt_state) != expected:
        raise ValueError(
            f"opt_state does not fit the optimizer of this {trainable.config.peft_type} adapter; "
            "create it with jpeft.train.init_opt_state(optimizer, trainable) (AdaLoRA keeps its "
            "rank allocator in the optimizer state)"
        )
