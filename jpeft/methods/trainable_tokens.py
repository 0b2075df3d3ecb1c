"""Trainable tokens: a few rows of an embedding table trained, the rest frozen (PEFT's format).

PEFT's `TrainableTokensConfig(token_indices=[...])` trains the rows `token_indices` of the input
embedding table (its default target) or of other targeted tables and output heads; LoRA offers the
same next to its low-rank pieces (`LoraConfig.trainable_token_indices`, see `jpeft.methods.lora`).
Per targeted weight W [vocab, dim] (an output head's [out, in] alike):

    rows [n, dim]: the trained rows themselves, not a change of them (PEFT's
        `trainable_tokens_delta`, saved in full); they start as a copy of W[token_indices]
        (`init_weights=False`: N(0, 1))
    embedding:  embed(ids) = W'[ids],  W' = W with W'[token_indices] = rows
    output head: x W'^T, which only changes the logits of `token_indices`

W' is never formed in a step: the lookup takes a row of `rows` where an id is one of the tokens
and a row of W elsewhere, and the head computes the n changed logits apart, so training makes no
[vocab, dim] gradient or copy. A model whose head is tied to its input table
(`tie_word_embeddings`) reads the same rows in its head, as PEFT's tied layer does; PEFT then saves
the rows twice, under the table and under `lm_head`, and so does jpeft.

The token ids and the rows they replace are frozen state of the adapter (PEFT's `token_indices`
and its unsaved `trainable_tokens_original`): the indices as an int array, so one compiled step
serves any adapter with as many tokens; the original rows so that `jpeft.unmerge` can restore
them (an adapter loaded without `params` has none, and cannot be unmerged).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import targeting
from jpeft import tree as jtree
from jpeft.adapter import Adapter
from jpeft.config import PeftConfig
from jpeft.method import PREFIX, JobOptionError, JobSpec, WeightMethod, register
from jpeft.methods import common
from jpeft.ops import dense
from jpeft.quant import QuantizedTensor

ROWS_KEY = "trainable_tokens_delta"
# frozen state per module: the token ids [n] int32 and the rows they replace [n, dim]
INDICES_KEY, ORIGINAL_KEY = "token_indices", "trainable_tokens_original"
TIED_HEAD = "lm_head"


@dataclasses.dataclass(frozen=True)
class TrainableTokensConfig(PeftConfig):
    """PEFT's `TrainableTokensConfig`: same field names, defaults and JSON.

    target_modules None means the model's input embedding table (PEFT writes its name,
    "model.embed_tokens", into the saved config).
    """

    token_indices: Sequence[int] = ()
    target_modules: str | Sequence[str] | None = None
    init_weights: bool = True

    def validate(self) -> None:
        check_token_indices("TrainableTokensConfig.token_indices", self.token_indices)


def check_token_indices(field: str, indices: Sequence[int]) -> None:
    """ValueError for negative or repeated ids: PEFT indexes with them as given, so a negative id
    silently trains a row counted from the end, and a repeated one leaves which copy of the row
    wins to the order `index_copy` happens to write in."""
    negative = sorted({i for i in indices if i < 0})
    if negative:
        raise ValueError(
            f"{field} holds negative token ids {negative}; token ids start at 0 (PEFT would "
            "train the row counted from the end of the table instead)"
        )
    repeated = sorted({i for i in indices if list(indices).count(i) > 1})
    if repeated:
        raise ValueError(
            f"{field} repeats token ids {repeated}; list each token once (PEFT keeps one row per "
            "entry, and which of two rows for one token wins is undefined)"
        )


# ---------------------------------------------------------------------------------------------
# the adapted-weight node


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """A table W [vocab, dim] (or an output head [out, in]) with the rows `indices` replaced.

    base [V, D]; rows [n, D] (any float dtype, used in the base's, as PEFT's `index_copy`);
    indices [n] int32; original [n, D] the replaced rows of the base, or None when unknown.
    """

    base: jax.Array
    rows: jax.Array
    indices: jax.Array
    original: jax.Array | None = None

    def _slots(self, ids: jax.Array) -> jax.Array:
        """For each id, its position in `indices`, or -1: same shape as `ids`."""
        vocab, count = self.base.shape[0], self.indices.shape[0]
        table = jnp.full((vocab,), -1, jnp.int32).at[self.indices].set(jnp.arange(count))
        return table[ids]

    def embed(self, ids: jax.Array) -> jax.Array:
        """`ids` [...] -> [..., D]: a trained row where an id is one of `indices`."""
        slots = self._slots(ids)
        trained = jnp.take(self.rows.astype(self.base.dtype), jnp.maximum(slots, 0), axis=0)
        return jnp.where((slots >= 0)[..., None], trained, jnp.take(self.base, ids, axis=0))

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., D] -> [..., V]: the base head, with the logits of `indices` from `rows`.

        PEFT's layer calls `F.linear` without the head's bias; jpeft adds it (no jpeft model has a
        head bias, where the two agree)."""
        logits = dense(x, self.base, bias)
        picked = dense(x, self.rows.astype(self.base.dtype))
        if bias is not None:
            picked = picked + bias[self.indices].astype(picked.dtype)
        return logits.at[..., self.indices].set(picked.astype(logits.dtype))

    def merged_weight(self) -> jax.Array:
        """W' [V, D]: the rows written into the table."""
        return self.base.at[self.indices].set(self.rows.astype(self.base.dtype))

    def unmerged_weight(self) -> jax.Array:
        """W [V, D] back, from the original rows the adapter keeps."""
        if self.original is None:
            raise ValueError(
                "this trainable-tokens adapter was loaded without params, so it does not know "
                "the rows it replaced and cannot unmerge; load it with "
                "jpeft.load_pretrained(dir, params) or keep the original params"
            )
        return self.base.at[self.indices].set(self.original.astype(self.base.dtype))


jax.tree_util.register_dataclass(
    TokenRows, data_fields=["base", "rows", "indices", "original"], meta_fields=[]
)


def make_token_node(base: Any, rows: jax.Array, frozen: Mapping[str, jax.Array]) -> TokenRows:
    """The node for one table or head, from its rows and frozen state (see the module doc)."""
    if base.ndim != 2:
        raise ValueError(
            f"trainable tokens adapt a table or head of its own ([vocab, dim]), not the "
            f"stacked layer weights of shape {tuple(base.shape)}; target an embedding table or "
            "an output head"
        )
    return TokenRows(base, rows, frozen[INDICES_KEY], frozen.get(ORIGINAL_KEY))


# ---------------------------------------------------------------------------------------------
# building the pieces


def init_token_rows(
    params: Mapping[str, Any], ref: jtree.ModuleRef, indices: Sequence[int], random: bool, key
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """({piece: rows}, frozen state) for the module `ref`: a copy of its rows `indices` (N(0, 1)
    rows with `random`), in the adapter dtype of the base weight."""
    if ref.layer is not None:
        raise ValueError(
            f"{ref.name}: jpeft trains tokens of an embedding table or an output head, not of a "
            "layer's projection (PEFT accepts any nn.Linear); target the embedding (the default) "
            "or lm_head"
        )
    weight = jtree.get_path(params, jtree.tied_head_source(params, f"{ref.tree_path}.weight"))
    if isinstance(weight, QuantizedTensor):
        raise ValueError(f"{ref.name} is 4-bit quantized; trainable tokens need a float table")
    check_token_range(ref.name, indices, weight.shape)
    ids = jnp.asarray(np.asarray(indices, np.int32).reshape(-1))
    original = jnp.take(weight, ids, axis=0)
    dtype = common.adapter_dtype(weight)
    if random:
        rows = jax.random.normal(key, original.shape, jnp.float32).astype(dtype)
    else:
        rows = jnp.array(original, dtype, copy=True)  # its own buffer: steps donate the rows
    return {ROWS_KEY: rows}, {INDICES_KEY: ids, ORIGINAL_KEY: original}


def check_token_range(module: str, indices: Sequence[int], shape: tuple[int, ...]) -> None:
    """ValueError naming the ids a table of `shape` [vocab, dim] does not have."""
    outside = sorted(i for i in indices if i >= shape[0])
    if outside:
        raise ValueError(
            f"{module} has {shape[0]} rows (weight shape {tuple(shape)}), but the token ids "
            f"{outside} are beyond them; resize the embeddings first or pick ids below {shape[0]}"
        )


def frozen_for_file(
    params: Mapping[str, Any] | None, module: str, indices: Sequence[int]
) -> dict[str, jax.Array]:
    """The frozen state of a module read from a file: the ids, and the rows they replace when
    `params` are given (PEFT's unsaved `trainable_tokens_original`)."""
    ids = jnp.asarray(np.asarray(indices, np.int32).reshape(-1))
    frozen = {INDICES_KEY: ids}
    if params is not None:
        tree_path, _ = jtree.hf_param_path(params, module)
        path = jtree.tied_head_source(params, f"{tree_path}.weight")
        weight = jtree.get_path(params, path)
        check_token_range(module, indices, weight.shape)
        frozen[ORIGINAL_KEY] = jnp.take(weight, ids, axis=0)
    return frozen


def check_rows(module: str, rows_shape: tuple, count: int, dim: int | None, where: str) -> None:
    """ValueError when a module's rows are not [count, dim] (dim None: any width)."""
    if len(rows_shape) != 2 or rows_shape[0] != count or dim not in (None, rows_shape[1]):
        want = f"({count}, {'dim' if dim is None else dim})"
        raise ValueError(
            f"{where}{module}.{ROWS_KEY} has shape {tuple(rows_shape)}, but {count} token ids "
            f"need rows of shape {want}; was it saved with other token_indices or for another "
            "model?"
        )


def input_embedding(params: Mapping[str, Any]) -> jtree.ModuleRef:
    """The model's input embedding table (PEFT's `get_input_embeddings`)."""
    tables = [ref for ref in jtree.hf_modules(params) if ref.kind == "embedding"]
    if len(tables) != 1:
        names = [ref.name for ref in tables]
        raise ValueError(
            f"the model has {len(tables)} embedding tables {names}, so its input embedding is "
            "not clear; name the table in target_modules"
        )
    return tables[0]


def ties_head(params: Mapping[str, Any], module: str) -> bool:
    """Whether the model's output head reads the table `module` (tied word embeddings)."""
    head = f"{TIED_HEAD}.weight"
    return jtree.tied_head_source(params, head) == f"{module}.weight" != head


# ---------------------------------------------------------------------------------------------
# next to LoRA: LoraConfig.trainable_token_indices

LORA_ROWS_KEY = f"token_adapter.{ROWS_KEY}"


def check_lora_token_indices(indices: Sequence[int] | Mapping[str, Sequence[int]] | None):
    """`check_token_indices` on each list of `LoraConfig.trainable_token_indices`."""
    field = "LoraConfig.trainable_token_indices"
    if isinstance(indices, Mapping):
        for module, ids in indices.items():
            check_token_indices(f"{field}[{module!r}]", ids)
    elif indices is not None:
        check_token_indices(field, indices)


def lora_token_modules(
    params: Mapping[str, Any], indices: Sequence[int] | Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """{module: token ids} that `LoraConfig.trainable_token_indices` trains, by PEFT's rules: a
    list means the input embedding; a dict's keys match the module names ending with them. A
    tied head listed with the table's own ids is the table's (PEFT ties the two)."""
    if indices is None:
        return {}
    table = input_embedding(params).name
    if not isinstance(indices, Mapping):
        return {table: tuple(indices)}
    modules = {}
    for key, ids in indices.items():
        if ties_head(params, table) and TIED_HEAD.endswith(key):
            if tuple(ids) != tuple(_table_ids(indices, table)):
                raise ValueError(
                    f"LoraConfig.trainable_token_indices gives the tied head {key!r} the ids "
                    f"{list(ids)}, other than the table's; this model ties lm_head to {table}, "
                    "and jpeft trains a token's row for both at once: give both the same ids, or "
                    "list the table alone"
                )
            continue
        matched = [ref.name for ref in jtree.hf_modules(params) if ref.name.endswith(key)]
        if not matched:
            raise ValueError(
                f"LoraConfig.trainable_token_indices names {key!r}, which matches no module of "
                f"the model (the input embedding is {table!r})"
            )
        modules.update({name: tuple(ids) for name in matched})
    return modules


def _table_ids(indices: Mapping[str, Sequence[int]], table: str) -> Sequence[int]:
    return next((ids for key, ids in indices.items() if table.endswith(key)), ())


def lora_token_ids(
    indices: Sequence[int] | Mapping[str, Sequence[int]] | None, module: str
) -> tuple[int, ...]:
    """The ids `trainable_token_indices` gives `module`, read without the model: a list is the
    input embedding's, the one module that holds token rows."""
    if indices is None:
        return ()
    if not isinstance(indices, Mapping):
        return tuple(indices)
    return tuple(next((ids for key, ids in indices.items() if module.endswith(key)), ()))


def add_lora_token_rows(adapter: Adapter, params: Mapping[str, Any], indices) -> Adapter:
    """`adapter` (LoRA) with the token rows of `trainable_token_indices` added; ValueError where
    PEFT refuses: a module LoRA adapts, or one in modules_to_save."""
    weights, frozen = dict(adapter.weights), dict(adapter.frozen)
    refs = {ref.name: ref for ref in jtree.hf_modules(params)}
    for module, ids in lora_token_modules(params, indices).items():
        if module in weights:
            raise ValueError(
                f"{module} is both a LoRA target and in trainable_token_indices; PEFT cannot "
                "put trainable tokens on a LoRA layer either: drop it from target_modules"
            )
        if f"{module}.weight" in adapter.overrides:
            raise ValueError(
                f"{module} is in modules_to_save and in trainable_token_indices; train the whole "
                "table (modules_to_save) or some of its rows, not both (PEFT refuses this too)"
            )
        pieces, state = init_token_rows(params, refs[module], ids, False, None)
        weights[module] = {LORA_ROWS_KEY: pieces[ROWS_KEY]}
        frozen[module] = state
    return adapter.replace(weights=weights, frozen=frozen)


def token_frozen_for_file(adapter: Adapter, params, indices) -> Adapter:
    """A loaded LoRA adapter with the frozen state of its token-row modules."""
    frozen = dict(adapter.frozen)
    for module, pieces in adapter.weights.items():
        if LORA_ROWS_KEY in pieces:
            frozen[module] = frozen_for_file(params, module, lora_token_ids(indices, module))
    return adapter.replace(frozen=frozen)


# ---------------------------------------------------------------------------------------------
# the method


@register
class TrainableTokens(WeightMethod):
    """Trainable tokens on embedding tables and output heads."""

    peft_type = "TRAINABLE_TOKENS"
    name = "trainable-tokens"
    config_class = TrainableTokensConfig
    default_lr = 1e-2
    job_help = "trainable tokens: the rows of the instruction's tokens (incl. the label words)"
    piece_names = (ROWS_KEY,)
    piece_axes = {ROWS_KEY: (None, 1)}

    def init_adapter(self, params, config: TrainableTokensConfig, key, model=None) -> Adapter:
        """Rows copied from each target; a head tied to the table is noted by an empty frozen
        entry (`frozen["lm_head"] = {}`: no rows of its own), so the file holds its copy of the
        rows as PEFT's does."""
        if config.target_modules is None:
            config = config.replace(target_modules=input_embedding(params).name)
        weights, frozen = {}, {}
        for index, ref in enumerate(targeting.resolve_targets(params, config, defaults={})):
            piece, state = init_token_rows(
                params,
                ref,
                config.token_indices,
                not config.init_weights,
                jax.random.fold_in(key, index),
            )
            weights[ref.name], frozen[ref.name] = piece, state
            if ties_head(params, ref.name):
                frozen[TIED_HEAD] = {}
        return Adapter(config, weights, {}, frozen)

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        return make_token_node(base, pieces[ROWS_KEY], frozen)

    def check_shapes(self, config, module: str, base_shape: tuple, pieces) -> None:
        check_token_range(module, config.token_indices, base_shape)
        check_rows(module, np.shape(pieces[ROWS_KEY]), len(config.token_indices), base_shape[1], "")

    def check_file_pieces(self, config, module: str, pieces, source: str) -> None:
        count = len(config.token_indices)
        check_rows(module, np.shape(pieces[ROWS_KEY]), count, None, f"{source}: ")

    def to_file(self, adapter: Adapter):
        """The rows per module, and under `lm_head` again for a head tied to the table."""
        data, tensors = super().to_file(adapter)
        if TIED_HEAD in adapter.frozen and TIED_HEAD not in adapter.weights:
            table = next(iter(adapter.weights))
            tensors[f"{PREFIX}{TIED_HEAD}.{ROWS_KEY}"] = adapter.weights[table][ROWS_KEY]
        return data, tensors

    def from_file(self, config, tensors, params, source: str) -> Adapter:
        """A head's rows equal to the table's are the tied copy PEFT writes; PEFT's
        `lm_head.base_layer` rows (when the tied head was also named in target_modules) are never
        read by its forward, and are skipped."""
        tensors = {
            key: value
            for key, value in tensors.items()
            if not key.endswith(f"{TIED_HEAD}.base_layer.{ROWS_KEY}")
        }
        adapter = super().from_file(config, tensors, params, source)
        weights = dict(adapter.weights)
        tied = _tied_copy(weights, params, source)
        frozen = {
            module: frozen_for_file(params, module, config.token_indices) for module in weights
        }
        if tied:
            del weights[TIED_HEAD]
            frozen[TIED_HEAD] = {}
        return adapter.replace(weights=weights, frozen=frozen)

    def job_config(self, job: JobSpec) -> TrainableTokensConfig:
        """The ids of the instruction's tokens, and of each of its words alone, so the label
        words the instruction lists are trained as the answers spell them."""
        return TrainableTokensConfig(token_indices=instruction_tokens(job), **job.common)


def _tied_copy(weights: Mapping[str, Any], params, source: str) -> bool:
    """Whether the file's `lm_head` rows are the tied copy of its embedding table's rows."""
    if TIED_HEAD not in weights or len(weights) != 2:
        return False
    table = next(name for name in weights if name != TIED_HEAD)
    if params is not None and not ties_head(params, table):
        return False
    same = np.array_equal(np.asarray(weights[TIED_HEAD][ROWS_KEY]), weights[table][ROWS_KEY])
    if not same and params is not None:
        raise ValueError(
            f"{source}: the model ties lm_head to {table}, but the file's {TIED_HEAD}.{ROWS_KEY} "
            f"differs from {table}.{ROWS_KEY}; PEFT writes the same rows twice for a tied head, "
            "so this file was trained on a model without tied embeddings"
        )
    return same


def instruction_tokens(job: JobSpec) -> list[int]:
    """Sorted distinct ids of the instruction and of each of its words on its own."""
    from jpeft.tokenizer import load_tokenizer

    if not job.instruction.strip():
        raise JobOptionError(
            "--method trainable-tokens trains the rows of the instruction's tokens, and this "
            "data has no labels, so no instruction; use it on classification data (text,label)"
        )
    tokenizer = load_tokenizer(job.model_path)
    texts = [job.instruction, *re.findall(r"\w+", job.instruction)]
    ids = {i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
    return sorted(ids)
