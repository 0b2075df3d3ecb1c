"""Checks of what a caller hands a model: token ids, masks, dropout keys, dtypes.

Shapes and dtypes are checked in Python while a call is traced, so under `jax.jit` they cost
nothing and never cause a recompilation. Token id values are checked when they are concrete (an
eager call); inside `jax.jit` they are abstract, and only a model built with `check_ids=True`
checks them, through `jax.experimental.checkify`, which needs the jitted function wrapped:

    model = dataclasses.replace(model, check_ids=True)
    step = jpeft.models.checked(jpeft.train.make_train_step(model, optimizer))
    adapter, opt_state, loss = step(params, adapter, opt_state, batch)  # ValueError on a bad id

Without `checked` (or `checkify.checkify`) around it, a jitted call of a `check_ids=True` model
fails to trace, saying that a `checkify.check` was not functionalized.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


def check_inputs(
    vocab_size: int,
    input_ids: Any,
    attention_mask: Any = None,
    position_ids: Any = None,
    dropout_key: Any = None,
    *,
    check_ids: bool = False,
) -> None:
    """ValueError naming the argument when the inputs of a model call do not fit together.

    `input_ids` [B, S] integers with B, S > 0, each in [0, vocab_size) where concrete (with
    `check_ids`, also inside `jax.jit` through checkify); `attention_mask` [B, S];
    `position_ids` [B, S] or [1, S] (broadcast over the batch, as transformers allows);
    `dropout_key` a PRNG key or None.
    """
    _check_ids_array(input_ids)
    shape = tuple(input_ids.shape)
    _check_shape("attention_mask", attention_mask, (shape,))
    _check_shape("position_ids", position_ids, (shape, (1, shape[1])))
    check_dropout_key(dropout_key)
    _check_id_range(input_ids, vocab_size, check_ids)


def check_dropout_key(key: Any) -> None:
    """ValueError unless `key` is None, a typed key (`jax.random.key`) or a raw one
    (`jax.random.PRNGKey`)."""
    if key is None or _is_typed_key(key) or _is_raw_key(key):
        return
    raise ValueError(
        f"dropout_key must be a JAX PRNG key, got {_describe(key)}; make one with "
        "jax.random.key(seed) (or jax.random.PRNGKey(seed)), and a new one per step with "
        "jax.random.fold_in(key, step)"
    )


def check_max_new_tokens(max_new_tokens: Any, filled: int, max_positions: int) -> int:
    """`max_new_tokens` as an int, or ValueError when it is not an int >= 0 or when the `filled`
    slots (virtual tokens and prompt) plus the new tokens exceed `max_positions`."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise ValueError(
            f"max_new_tokens must be an int >= 0, got {type(max_new_tokens).__name__} "
            f"{max_new_tokens!r}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens}")
    if filled + max_new_tokens > max_positions:
        raise ValueError(
            f"the prompt ({filled} positions, virtual tokens included) plus max_new_tokens="
            f"{max_new_tokens} exceeds the model's max_position_embeddings={max_positions}; "
            "shorten the prompt or ask for fewer tokens"
        )
    return int(max_new_tokens)


def float_dtype(dtype: Any) -> np.dtype:
    """`dtype` as a numpy dtype, or ValueError when it is not a floating-point one."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        given = repr(dtype) if resolved is None else resolved.name
        raise ValueError(
            f"dtype={given} is not a floating-point dtype; model params need one, e.g. "
            "jnp.float32 or jnp.bfloat16"
        )
    return resolved


def checked(fn: Callable) -> Callable:
    """`fn` (e.g. a jitted train step) run under `checkify.checkify`: a failed `checkify.check`
    inside it, such as an out-of-range id of a `check_ids=True` model, raises ValueError.

    Each call waits for the error flag, so the host no longer runs ahead of the device.
    Wrapping an already jitted function keeps its compilation cache: it compiles once per input
    shapes, as it would without the checks.
    """
    checkified = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        error, out = checkified(*args, **kwargs)
        message = error.get()
        if message is not None:
            raise ValueError(message)
        return out

    return run


def _check_ids_array(input_ids: Any) -> None:
    """ValueError unless `input_ids` is a non-empty integer array [batch, seq]."""
    dtype = getattr(input_ids, "dtype", None)
    if dtype is None:
        raise ValueError(
            f"input_ids must be an integer array [batch, seq], got {type(input_ids).__name__}; "
            "convert it with jnp.asarray"
        )
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"input_ids must hold integer token ids, got dtype {dtype}; token ids come from the "
            "tokenizer (cast them with .astype(jnp.int32))"
        )
    if input_ids.ndim != 2 or 0 in input_ids.shape:
        raise ValueError(
            f"input_ids must be [batch, seq] with batch, seq > 0, got shape "
            f"{tuple(input_ids.shape)}; add a batch axis with input_ids[None] for one sequence"
        )


def _check_shape(name: str, value: Any, allowed: tuple[tuple[int, ...], ...]) -> None:
    """ValueError when `value` (None: not given) has none of the `allowed` shapes."""
    if value is None or tuple(np.shape(value)) in allowed:
        return
    raise ValueError(
        f"{name} has shape {tuple(np.shape(value))}, but input_ids has shape {allowed[0]}; "
        f"{name} must be {' or '.join(map(str, allowed))}"
    )


def _id_range_message(vocab_size: int) -> str:
    """The out-of-range message, with `{min}` and `{max}` left for the offending values."""
    return (
        f"input_ids holds token ids outside [0, vocab_size={vocab_size}): min {{min}}, max "
        "{max}; were they made by another model's tokenizer?"
    )


def _check_id_range(input_ids: Any, vocab_size: int, traced_check: bool) -> None:
    """Ids outside [0, vocab_size) raise ValueError when concrete; inside a trace they are
    checked only with `traced_check` (a `checkify.check`)."""
    if _is_concrete(input_ids):
        ids = np.asarray(input_ids)
        low, high = ids.min(), ids.max()
        if low < 0 or high >= vocab_size:
            raise ValueError(_id_range_message(vocab_size).format(min=low, max=high))
    elif traced_check:
        ids = input_ids.astype(jnp.int32)
        checkify.check(
            jnp.all((ids >= 0) & (ids < vocab_size)),
            _id_range_message(vocab_size),
            min=jnp.min(ids),
            max=jnp.max(ids),
        )


def _is_concrete(x: Any) -> bool:
    """Whether the values of `x` can be read on this host (not traced, not on other hosts)."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def _is_typed_key(key: Any) -> bool:
    dtype = getattr(key, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and not key.ndim


def _is_raw_key(key: Any) -> bool:
    dtype = getattr(key, "dtype", None)
    return dtype == np.uint32 and tuple(key.shape) == _raw_key_shape()


@functools.cache
def _raw_key_shape() -> tuple[int, ...]:
    """The shape of a raw key of the default PRNG implementation ((2,) for threefry)."""
    return tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)


def _describe(value: Any) -> str:
    """`value` in a few words: `int32[2, 3]` for an array, else its type and repr."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and hasattr(value, "shape"):
        return f"{dtype}{list(value.shape)}"
    return f"{type(value).__name__} {value!r}"
