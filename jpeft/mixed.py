"""Mixed-adapter batches: each row of a batch through its own LoRA adapter, in one program.

`mix({"a": A, "b": B}, adapter_names=["a", "b", "__base__", ...])` stacks LoRA adapters into a
bank: per module A [N + 1, r, in] and B [N + 1, out, r] (r the module's largest rank over the
adapters, zero-padded; zeros for an adapter that does not adapt the module; entry N is all zeros:
PEFT's "__base__", no adapter), the scalings [N + 1], and each row's entry `rows` [batch]. A
targeted layer computes, for row b,

    y_b = x_b W^T + bias + s[rows_b] * (x_b A[rows_b]^T) B[rows_b]^T

as two gathered einsums: the cost grows with the rows, not with the number of adapters, the base
weights exist once, and nothing loops over adapters. `model.apply(params, ids, adapter={...},
adapter_names=[...])` does this (PEFT's argument; also `generate`).

The bank is an `Adapter` whose trainable leaves are the stacked pieces and whose frozen state is
the scalings and rows: differentiating it trains every adapter from its own rows only, in one
step (mixed-adapter training, beyond PEFT); `bank.select(names)` gives it the next batch's rows
and `unmix(bank)` gives back the adapters at their own ranks and configs. LoRA on linear layers,
with or without a 4-bit base; DoRA, PiSSA/OLoRA starts, embedding targets, trainable tokens and
modules_to_save copies cannot be mixed (PEFT has no mixed batches for DoRA either).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter import SHARED, Adapter
from jpeft.injection import Prepared, inject, untouched_layers
from jpeft.methods.lora import A_KEY, B_KEY
from jpeft.methods.lora_ops import dropout
from jpeft.ops import dense

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
SCALING, ROWS = "scaling", "adapter_rows"


@jax.tree_util.register_pytree_with_keys_class
class MixedAdapters(Adapter):
    """LoRA adapters stacked into one bank, with the entry each batch row uses (see module doc).

    weights {module: {A: [N + 1, r, in], B: [N + 1, out, r]}}; frozen {module: {"scaling":
    [N + 1]}, SHARED: {"adapter_rows": [batch] int32}}; names: the adapters, in bank order;
    sources: per adapter, (config, {module: rank}) to give them back (`unmix`).
    """

    def __init__(self, config, weights, frozen, names: tuple[str, ...], sources: tuple):
        super().__init__(config, weights, {}, frozen)
        self.names, self.sources = names, sources

    def tree_flatten_with_keys(self):
        children, config = super().tree_flatten_with_keys()
        return children, (config, self.names, self.sources)

    @classmethod
    def tree_unflatten(cls, aux, children):
        config, names, sources = aux
        bank = cls.__new__(cls)
        bank.config, bank.names, bank.sources = config, names, sources
        bank.weights, bank.overrides, bank.frozen = children
        return bank

    def replace(self, **changes: Any) -> MixedAdapters:
        """A bank of the same adapters with `changes` (weights, frozen; sharding specs too)."""
        fields = dict(config=self.config, weights=self.weights, frozen=self.frozen)
        fields.update(changes)
        if fields.pop("overrides", None):
            raise ValueError("a mixed-adapter bank has no overrides")
        return MixedAdapters(**fields, names=self.names, sources=self.sources)

    def select(self, adapter_names: Sequence[str]) -> MixedAdapters:
        """The same bank with each row using adapter `adapter_names[row]` ("__base__": none)."""
        frozen = {**self.frozen, SHARED: {ROWS: row_indices(self.names, adapter_names)}}
        return self.replace(frozen=frozen)

    def prepared(self, params: Mapping[str, Any], dropout_key: jax.Array | None) -> Prepared:
        """What `jpeft.injection.prepare` gives a model for this bank."""
        injected = inject(params, self, dropout_key=dropout_key, method=MIXED_LORA)
        return Prepared(injected, None, untouched_layers(params, self))


def row_indices(names: Sequence[str], adapter_names: Sequence[str]) -> jax.Array:
    """[batch] int32: each row's bank entry; ValueError naming an unknown adapter."""
    if isinstance(adapter_names, str):
        raise ValueError(
            f"adapter_names must list one name per row, got the string {adapter_names!r}"
        )
    unknown = sorted({n for n in adapter_names if n != BASE and n not in names})
    if unknown:
        raise ValueError(
            f"adapter_names holds {unknown}, which are not among the adapters {list(names)} "
            f"(or {BASE!r} for no adapter)"
        )
    index = {name: i for i, name in enumerate(names)} | {BASE: len(names)}
    return jnp.asarray([index[n] for n in adapter_names], jnp.int32)


def mix(adapters: Mapping[str, Adapter], adapter_names: Sequence[str]) -> MixedAdapters:
    """A bank of `adapters` (LoRA) whose row b uses `adapters[adapter_names[b]]`."""
    if isinstance(adapters, MixedAdapters):
        return adapters.select(adapter_names)
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError(
            "adapter_names needs adapter= to be a dict {name: Adapter} of LoRA adapters (or a "
            f"bank from jpeft.mixed.mix), got {type(adapters).__name__}"
        )
    names = tuple(adapters)
    for name, adapter in adapters.items():
        _check_mixable(name, adapter)
    rates = {a.config.lora_dropout for a in adapters.values()}
    if len(rates) > 1:
        raise ValueError(
            f"the adapters have different lora_dropout values {sorted(rates)}; a mixed batch "
            "runs one dropout: give them the same"
        )
    modules = sorted({m for a in adapters.values() for m in a.weights})
    weights, frozen = {}, {}
    for module in modules:
        weights[module], frozen[module] = _stack_module(module, list(adapters.values()))
    sources = tuple(
        (a.config, tuple((m, int(p[A_KEY].shape[0])) for m, p in a.weights.items()))
        for a in adapters.values()
    )
    first = next(iter(adapters.values())).config
    bank = MixedAdapters(first, weights, frozen, names, sources)
    return bank.select(adapter_names)


def unmix(bank: MixedAdapters) -> dict[str, Adapter]:
    """The bank's adapters, each at its own ranks, modules and config."""
    out = {}
    for index, (name, (config, ranks)) in enumerate(zip(bank.names, bank.sources, strict=True)):
        weights = {
            module: {
                A_KEY: bank.weights[module][A_KEY][index, :rank],
                B_KEY: bank.weights[module][B_KEY][index, :, :rank],
            }
            for module, rank in ranks
        }
        out[name] = Adapter(config, weights)
    return out


def _check_mixable(name: str, adapter: Adapter) -> None:
    config = adapter.config
    problem = None
    if not isinstance(adapter, Adapter) or config.peft_type != "LORA":
        problem = "is not a LoRA adapter (mixed batches are LoRA's, as in PEFT)"
    elif config.use_dora:
        problem = "uses DoRA, which PEFT cannot mix in a batch either"
    elif config.has_residual_init:
        problem = f"starts from init_lora_weights={config.init_lora_weights!r} (save and reload it)"
    elif adapter.overrides:
        problem = f"trains {sorted(adapter.overrides)[:2]} (modules_to_save or biases)"
    elif any(A_KEY not in pieces for pieces in adapter.weights.values()):
        problem = "adapts an embedding table or trains token rows (only linear layers mix)"
    if problem:
        raise ValueError(f"adapter {name!r} {problem}; it cannot be part of a mixed batch")


def _stack_module(module: str, adapters: list[Adapter]) -> tuple[dict, dict]:
    """({A: [N + 1, r, in], B: [N + 1, out, r]}, {"scaling": [N + 1]}) for one module."""
    present = [a.weights[module] for a in adapters if module in a.weights]
    rank = max(int(p[A_KEY].shape[0]) for p in present)
    a_shape, b_shape = present[0][A_KEY].shape[1:], present[0][B_KEY].shape[:1]
    dtype = present[0][A_KEY].dtype
    a_rows, b_rows, scalings = [], [], []
    for adapter in adapters:
        pieces = adapter.weights.get(module)
        if pieces is None:
            a_rows.append(jnp.zeros((rank, *a_shape), dtype))
            b_rows.append(jnp.zeros((*b_shape, rank), dtype))
            scalings.append(0.0)
            continue
        pad = rank - pieces[A_KEY].shape[0]
        a_rows.append(jnp.pad(pieces[A_KEY].astype(dtype), ((0, pad), (0, 0))))
        b_rows.append(jnp.pad(pieces[B_KEY].astype(dtype), ((0, 0), (0, pad))))
        scalings.append(adapter.config.scaling_for(module))
    a_rows.append(jnp.zeros((rank, *a_shape), dtype))  # __base__
    b_rows.append(jnp.zeros((*b_shape, rank), dtype))
    scalings.append(0.0)
    pieces = {A_KEY: jnp.stack(a_rows), B_KEY: jnp.stack(b_rows)}
    return pieces, {SCALING: jnp.asarray(scalings, jnp.float32)}


# ---------------------------------------------------------------------------------------------
# the node


@dataclasses.dataclass(frozen=True)
class MixedLoraWeight:
    """A linear weight with a bank of LoRA adapters and each row's entry (one layer's slice).

    base [out, in]; lora_A [N + 1, r, in]; lora_B [N + 1, out, r]; scaling [N + 1];
    rows [batch] int32; a leading stacked-layer axis [L] on all but the base when stacked.
    """

    base: jax.Array
    lora_A: jax.Array
    lora_B: jax.Array
    scaling: jax.Array
    rows: jax.Array
    dropout_key: jax.Array | None = None
    dropout_rate: float = 0.0

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [batch, ..., in] -> [batch, ..., out]: row b through entry rows[b]."""
        if x.shape[0] != self.rows.shape[0]:
            raise ValueError(
                f"the batch has {x.shape[0]} rows but adapter_names names {self.rows.shape[0]}; "
                "give one adapter name per row"
            )
        xd = dropout(x, self.dropout_rate, self.dropout_key)
        lora_a = jnp.take(self.lora_A, self.rows, axis=0).astype(x.dtype)  # [batch, r, in]
        lora_b = jnp.take(self.lora_B, self.rows, axis=0).astype(x.dtype)  # [batch, out, r]
        hidden = jnp.einsum("b...i,bri->b...r", xd, lora_a)
        delta = jnp.einsum("b...r,bor->b...o", hidden, lora_b)
        scale = jnp.take(self.scaling, self.rows).astype(x.dtype)
        return dense(x, self.base, bias) + delta * scale.reshape((-1,) + (1,) * (x.ndim - 1))

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError("a mixed LoRA linear weight was used as an embedding table")

    def merged_weight(self) -> jax.Array:
        raise ValueError("a mixed-adapter bank cannot be merged: merge each adapter (unmix)")

    unmerged_weight = merged_weight


jax.tree_util.register_dataclass(
    MixedLoraWeight,
    data_fields=["base", "lora_A", "lora_B", "scaling", "rows", "dropout_key"],
    meta_fields=["dropout_rate"],
)


class MixedLora:
    """How `jpeft.injection.inject` builds a bank's nodes (not a PEFT method: not registered)."""

    is_prompt_learning = False

    def check_shapes(self, config, module: str, base_shape: tuple[int, ...], pieces) -> None:
        out_dim, in_dim = base_shape
        got_a, got_b = tuple(np.shape(pieces[A_KEY])), tuple(np.shape(pieces[B_KEY]))
        if got_a[-1] != in_dim or got_b[-2] != out_dim:
            raise ValueError(
                f"{module}: the bank's pieces {got_a} / {got_b} do not fit the model's weight "
                f"{tuple(base_shape)}; were the adapters trained on another model?"
            )

    def module_constants(self, config, module: str, pieces) -> dict[str, float]:
        return {}

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        rows = frozen[ROWS]
        if active is not None:  # stacked layers: every leaf of the node gets the layer axis
            rows = jnp.broadcast_to(rows, (active.shape[0], *rows.shape))
        rate = config.lora_dropout if dropout_key is not None else 0.0
        return MixedLoraWeight(
            base,
            pieces[A_KEY],
            pieces[B_KEY],
            frozen[SCALING],
            rows,
            dropout_key if rate > 0 else None,
            rate,
        )


MIXED_LORA = MixedLora()
