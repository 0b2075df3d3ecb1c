"""LoRA and its variants (rsLoRA, DoRA, PiSSA/OLoRA init), with PEFT's semantics and file format.

Math (Hu et al. 2021, https://arxiv.org/abs/2106.09685), per targeted linear `W` [out, in]:

    y = x W^T + b + s * (dropout(x) A^T) B^T,   A [r, in], B [out, r],
    s = lora_alpha / r   (or lora_alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

W + s B A is never formed in the forward pass. DoRA (Liu et al. 2024,
https://arxiv.org/abs/2402.09353) adds a magnitude m [out]:
y = b + (m / ||W + s B A||_row) * ((W + s B A) x), the norm taken without gradient. PiSSA/OLoRA
start A, B from an SVD/QR of W and train on the residual W - s B0 A0; jpeft keeps W as it is and
carries B0, A0 as frozen state, which is the same function of x and leaves the base params
untouched. Embedding tables get `lora_embedding_A` [r, vocab] and `lora_embedding_B` [dim, r].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as jtree
from jpeft.adapter import Adapter
from jpeft.method import register
from jpeft.methods import trainable_tokens as tokens
from jpeft.methods.lora_ops import lora_embed, lora_linear
from jpeft.methods.low_rank import (
    LowRankConfig,
    LowRankMethod,
    check_bias,
    check_regex_targets,
    kaiming_uniform,
)
from jpeft.ops import as_array, dense
from jpeft.quant import QuantizedTensor

A_KEY, B_KEY, MAG_KEY = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"
EMB_A_KEY, EMB_B_KEY = "lora_embedding_A", "lora_embedding_B"

RESIDUAL_INITS = ("pissa", "olora")
SIMPLE_INITS = (True, False, "gaussian")


@dataclasses.dataclass(frozen=True)
class LoraConfig(LowRankConfig):
    """PEFT's `LoraConfig`: same field names, defaults and JSON."""

    ALPHA_FIELD: ClassVar[str] = "lora_alpha"
    DROPOUT_FIELDS: ClassVar[tuple[str, ...]] = ("lora_dropout",)

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: Sequence[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rank_pattern: Mapping[str, int] | None = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] | None = dataclasses.field(default_factory=dict)
    megatron_core: str | None = "megatron.core"
    loftq_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    qalora_group_size: int = 16
    trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None

    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "lora_bias": False,
        "use_qalora": False,
        "ensure_weight_tying": False,
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "corda_config": None,
        "eva_config": None,
        "kasa_config": None,
        "layer_replication": None,
        "lora_ga_config": None,
        "megatron_config": None,
        "monteclora_config": None,
        "target_parameters": None,
        "use_bdlora": None,
        "velora_config": None,
    }

    def validate(self) -> None:
        super().validate()
        # LoRA's (and AdaLoRA's) checks; PEFT's LyCORIS configs accept both and ignore the layers
        check_regex_targets(self)
        check_bias(self, "lora_only")
        tokens.check_lora_token_indices(self.trainable_token_indices)
        init = self.init_lora_weights
        if not (init in SIMPLE_INITS or init in RESIDUAL_INITS or _pissa_niter(init) is not None):
            raise ValueError(
                f"LoraConfig.init_lora_weights={init!r} is not supported by jpeft; use True, "
                "False, 'gaussian', 'pissa', 'pissa_niter_<n>' or 'olora'"
            )

    @property
    def has_residual_init(self) -> bool:
        """PiSSA/OLoRA: the adapter starts from a decomposition of W and trains on the residual."""
        return self.init_lora_weights in RESIDUAL_INITS or _pissa_niter(self.init_lora_weights)

    def scaling_for(self, module_name: str) -> float:
        rank, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pissa_niter(init: Any) -> int | None:
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        suffix = init[len("pissa_niter_") :]
        return int(suffix) if suffix.isdigit() else None
    return None


# ---------------------------------------------------------------------------------------------
# the adapted-weight nodes


@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A linear weight with LoRA: leaves may carry a leading stacked-layer axis.

    base [out, in]; lora_A [r, in]; lora_B [out, r]; scaling []; magnitude [out] (DoRA);
    init_A / init_B [r, in] / [out, r] (PiSSA/OLoRA frozen start); active [] bool (stacked
    layers the adapter covers); dropout_key: a PRNG key when dropout is on.
    """

    base: jax.Array
    lora_A: jax.Array
    lora_B: jax.Array
    scaling: jax.Array
    magnitude: jax.Array | None = None
    init_A: jax.Array | None = None
    init_B: jax.Array | None = None
    active: jax.Array | None = None
    dropout_key: jax.Array | None = None
    dropout_rate: float = 0.0

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out]."""
        return lora_linear(x, self, bias)

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError("a LoRA linear weight was used as an embedding table")

    def delta(self) -> jax.Array:
        """s (B A - B0 A0): [..., out, in]."""
        delta = jnp.einsum("...or,...ri->...oi", self.lora_B, self.lora_A)
        if self.init_A is not None:
            delta = delta - jnp.einsum("...or,...ri->...oi", self.init_B, self.init_A)
        return delta * jnp.asarray(self.scaling)[..., None, None]

    def merged_weight(self) -> jax.Array:
        weight = self.base.astype(jnp.float32) + self.delta()
        if self.magnitude is not None:
            norm = jnp.linalg.norm(weight, axis=-1)
            factor = self.magnitude / norm
            if self.active is not None:
                factor = jnp.where(self.active[..., None], factor, 1.0)
            weight = weight * factor[..., None]
        return weight.astype(self.base.dtype)

    def unmerged_weight(self) -> jax.Array:
        if self.magnitude is not None:
            raise ValueError(
                "DoRA merges are not invertible without the weight norm PEFT caches in its layer; "
                "keep the original params instead of unmerging"
            )
        return (self.base.astype(jnp.float32) - self.delta()).astype(self.base.dtype)


@dataclasses.dataclass(frozen=True)
class LoraEmbedding:
    """An embedding table [vocab, dim] with LoRA: lora_embedding_A [r, vocab], _B [dim, r]."""

    base: jax.Array
    lora_A: jax.Array
    lora_B: jax.Array
    scaling: jax.Array

    def embed(self, ids: jax.Array) -> jax.Array:
        """`ids` [...] -> [..., dim]."""
        return lora_embed(ids, self)

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """A tied output head reads the frozen table, as in PEFT (the delta is input-side only)."""
        return dense(x, self.base, bias)

    def merged_weight(self) -> jax.Array:
        delta = jnp.einsum("...dr,...rv->...vd", self.lora_B, self.lora_A)
        delta = delta * jnp.asarray(self.scaling)[..., None, None]
        return (self.base.astype(jnp.float32) + delta).astype(self.base.dtype)

    def unmerged_weight(self) -> jax.Array:
        delta = jnp.einsum("...dr,...rv->...vd", self.lora_B, self.lora_A)
        delta = delta * jnp.asarray(self.scaling)[..., None, None]
        return (self.base.astype(jnp.float32) - delta).astype(self.base.dtype)


jax.tree_util.register_dataclass(
    LoraWeight,
    data_fields=[
        "base",
        "lora_A",
        "lora_B",
        "scaling",
        "magnitude",
        "init_A",
        "init_B",
        "active",
        "dropout_key",
    ],
    meta_fields=["dropout_rate"],
)
jax.tree_util.register_dataclass(
    LoraEmbedding, data_fields=["base", "lora_A", "lora_B", "scaling"], meta_fields=[]
)


# ---------------------------------------------------------------------------------------------
# init


def _init_linear(config: LoraConfig, name: str, weight, key) -> tuple[dict, dict]:
    """LoRA pieces (and frozen start, for PiSSA/OLoRA) for one linear weight [out, in]."""
    out_dim, in_dim = weight.shape
    rank, scaling = config.rank_for(name), config.scaling_for(name)
    key_a, key_b = jax.random.split(key)
    init = config.init_lora_weights
    frozen = {}
    if init is True:
        lora_a = kaiming_uniform(key_a, (rank, in_dim), in_dim)
        lora_b = jnp.zeros((out_dim, rank), jnp.float32)
    elif init == "gaussian":
        lora_a = jax.random.normal(key_a, (rank, in_dim), jnp.float32) / rank
        lora_b = jnp.zeros((out_dim, rank), jnp.float32)
    elif init is False:
        lora_a = kaiming_uniform(key_a, (rank, in_dim), in_dim)
        lora_b = kaiming_uniform(key_b, (out_dim, rank), rank)
    else:
        lora_a, lora_b = _decomposition_init(config, weight, rank, scaling, key_a)
        frozen = {A_KEY: lora_a, B_KEY: lora_b}
    pieces = {A_KEY: lora_a, B_KEY: lora_b}
    if config.use_dora:
        w = as_array(weight, jnp.float32)
        pieces[MAG_KEY] = jnp.linalg.norm(w + scaling * (lora_b @ lora_a), axis=1)
    return pieces, frozen


def _decomposition_init(config: LoraConfig, weight, rank: int, scaling: float, key):
    """PiSSA (principal singular vectors) or OLoRA (QR) factors with s B A = top part of W."""
    if isinstance(weight, QuantizedTensor):
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} decomposes the base weight, which is "
            "4-bit quantized here (PEFT refuses this too); initialise on the float model, save "
            "the adapter converted to plain LoRA, and load the float base quantized afterwards"
        )
    w = jnp.asarray(weight, jnp.float32)
    if config.init_lora_weights == "olora":
        q, r = jnp.linalg.qr(w)
        return r[:rank], q[:, :rank]
    niter = _pissa_niter(config.init_lora_weights)
    if niter is None:
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(w, rank, niter, key)
    root = jnp.sqrt(s[:rank] / scaling)
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def _randomized_svd(w: jax.Array, rank: int, niter: int, key) -> tuple[jax.Array, ...]:
    """Halko et al.'s subspace iteration, as torch.svd_lowrank (q = rank + 6 oversampling)."""
    q = min(rank + 6, *w.shape)
    basis, _ = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], q), w.dtype))
    for _ in range(niter):
        basis, _ = jnp.linalg.qr(w.T @ basis)
        basis, _ = jnp.linalg.qr(w @ basis)
    u_small, s, vh = jnp.linalg.svd(basis.T @ w, full_matrices=False)
    return basis @ u_small, s, vh


def frozen_start(params, config: LoraConfig, module_names: list[str]) -> dict:
    """PiSSA/OLoRA's starting factors {module: {A, B}} from the base weights, as PEFT recomputes
    them when it loads such an adapter."""
    frozen = {}
    for name in module_names:
        tree_path, layer = jtree.hf_param_path(params, f"{name}.weight")
        weight = jtree.layer_of(jtree.get_path(params, tree_path), layer)
        lora_a, lora_b = _decomposition_init(
            config, weight, config.rank_for(name), config.scaling_for(name), jax.random.key(0)
        )
        frozen[name] = {A_KEY: lora_a.astype(weight.dtype), B_KEY: lora_b.astype(weight.dtype)}
    return frozen


def _init_embedding(config: LoraConfig, name: str, table, key) -> dict:
    vocab, dim = table.shape
    rank = config.rank_for(name)
    key_a, key_b = jax.random.split(key)
    if config.use_dora:
        raise ValueError(f"{name}: DoRA on embedding layers is not supported by jpeft")
    if config.init_lora_weights is False:
        lora_a = jax.random.normal(key_a, (rank, vocab), jnp.float32)
    else:
        lora_a = jnp.zeros((rank, vocab), jnp.float32)
    return {EMB_A_KEY: lora_a, EMB_B_KEY: jax.random.normal(key_b, (dim, rank), jnp.float32)}


# ---------------------------------------------------------------------------------------------
# PEFT's file format


def to_saved(adapter: Adapter) -> Adapter:
    """PiSSA/OLoRA -> plain LoRA: A' = [A; A0], B' = [B, -B0], r and alpha doubled (as PEFT's
    `path_initial_model_for_weight_conversion`), so the file loads on the original base weights."""
    config = adapter.config
    if not config.has_residual_init:
        return adapter
    weights = {}
    for module, pieces in adapter.weights.items():
        weights[module] = dict(pieces)
        if tokens.LORA_ROWS_KEY in pieces:
            continue
        start = adapter.frozen[module]
        weights[module][A_KEY] = jnp.concatenate([pieces[A_KEY], start[A_KEY]], axis=0)
        weights[module][B_KEY] = jnp.concatenate([pieces[B_KEY], -start[B_KEY]], axis=1)
    alpha_factor = 2**0.5 if config.use_rslora else 2
    config = config.replace(
        init_lora_weights=True,
        r=config.r * 2,
        lora_alpha=config.lora_alpha * alpha_factor,
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: 2 * v for k, v in (config.alpha_pattern or {}).items()},
    )
    return Adapter(config, weights, adapter.overrides)


def from_saved(adapter: Adapter, params, source: str) -> Adapter:
    """An unconverted PiSSA/OLoRA file: recompute the starting factors from the base weights,
    as PEFT does when it loads one."""
    config = adapter.config
    if not config.has_residual_init:
        return adapter
    if params is None:
        raise ValueError(
            f"{source}: init_lora_weights={config.init_lora_weights!r} adapters are saved "
            "relative to the residual of the base weights; pass params= so jpeft can recompute "
            "it as PEFT does, or save from PEFT with path_initial_model_for_weight_conversion to "
            "get a plain LoRA"
        )
    low_rank = [name for name, pieces in adapter.weights.items() if A_KEY in pieces]
    return adapter.replace(frozen=frozen_start(params, config, low_rank))


def is_embedding(pieces) -> bool:
    """Whether a module's pieces are an embedding table's (lora_embedding_A/B)."""
    return EMB_A_KEY in pieces or EMB_B_KEY in pieces


@register
class Lora(LowRankMethod):
    """LoRA (with rsLoRA, DoRA, PiSSA/OLoRA) on linear and embedding layers."""

    peft_type = "LORA"
    name = "lora"
    config_class = LoraConfig
    default_lr = 2e-3
    job_help = "LoRA, r=--r, alpha=--lora-alpha, all-linear on the top layers"
    module_kinds = ("linear", "embedding")
    piece_names = (A_KEY, B_KEY, MAG_KEY, EMB_A_KEY, EMB_B_KEY, tokens.LORA_ROWS_KEY)
    # A [r, in], B [out, r], magnitude [out]; on a table [vocab, dim]: A [r, vocab], B [dim, r];
    # trainable token rows [n, dim]
    piece_axes = {
        A_KEY: (None, 1),
        B_KEY: (0, None),
        MAG_KEY: (0,),
        EMB_A_KEY: (None, 0),
        EMB_B_KEY: (1, None),
        tokens.LORA_ROWS_KEY: (None, 1),
    }

    def init_adapter(self, params, config: LoraConfig, key, model=None) -> Adapter:
        """LoRA's pieces, and the rows of `trainable_token_indices` (see
        `jpeft.methods.trainable_tokens`)."""
        adapter = super().init_adapter(params, config, key, model)
        return tokens.add_lora_token_rows(adapter, params, config.trainable_token_indices)

    def init_module(self, config: LoraConfig, ref, weight, key):
        if ref.kind == "embedding":
            if config.has_residual_init:
                raise ValueError(
                    f"{ref.name}: {config.init_lora_weights} init needs a linear layer"
                )
            return _init_embedding(config, ref.name, weight, key), {}
        return _init_linear(config, ref.name, weight, key)

    def module_constants(self, config: LoraConfig, module: str, pieces):
        return {"scaling": config.scaling_for(module)}

    def expected_shapes(self, config, module: str, base_shape, pieces):
        """A [r, in], B [out, r], and the magnitude [out] with DoRA (or when the adapter has
        one); on a table [vocab, dim], A [r, vocab] and B [dim, r]."""
        out_dim, in_dim = base_shape
        rank = config.rank_for(module)
        if is_embedding(pieces):
            return {EMB_A_KEY: (rank, out_dim), EMB_B_KEY: (in_dim, rank)}
        shapes = {A_KEY: (rank, in_dim), B_KEY: (out_dim, rank)}
        if config.use_dora or MAG_KEY in pieces:
            shapes[MAG_KEY] = (out_dim,)
        return shapes

    def check_shapes(self, config, module: str, base_shape: tuple[int, ...], pieces) -> None:
        if tokens.LORA_ROWS_KEY in pieces:
            ids = tokens.lora_token_ids(config.trainable_token_indices, module)
            tokens.check_token_range(module, ids, base_shape)
            rows = np.shape(pieces[tokens.LORA_ROWS_KEY])
            tokens.check_rows(module, rows, len(ids), base_shape[1], "")
            return
        super().check_shapes(config, module, base_shape, pieces)

    def check_file_pieces(self, config, module: str, pieces, source: str) -> None:
        """`use_dora` against the magnitude vectors (PEFT builds them from the config alone),
        then the pieces and ranks (see `LowRankMethod.check_file_pieces`); token rows against
        `trainable_token_indices`."""
        if tokens.LORA_ROWS_KEY in pieces:
            if len(pieces) > 1:
                raise ValueError(
                    f"{source}: {module} holds LoRA pieces and trainable token rows "
                    f"({sorted(pieces)}); PEFT puts them on different modules"
                )
            ids = tokens.lora_token_ids(config.trainable_token_indices, module)
            rows = np.shape(pieces[tokens.LORA_ROWS_KEY])
            tokens.check_rows(module, rows, len(ids), None, f"{source}: ")
            return
        if is_embedding(pieces) and MAG_KEY in pieces:
            raise ValueError(
                f"{source}: {module} is an embedding with a {MAG_KEY}: DoRA on embedding layers "
                "is not supported by jpeft"
            )
        if not is_embedding(pieces) and (MAG_KEY in pieces) != config.use_dora:
            has = "has a" if MAG_KEY in pieces else "has no"
            raise ValueError(
                f"{source}: {module} {has} {MAG_KEY}, but adapter_config.json has "
                f"use_dora={config.use_dora} (PEFT gives every linear module a magnitude with "
                "use_dora=true and none without); the file and its config disagree"
            )
        super().check_file_pieces(config, module, pieces, source)

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        if tokens.LORA_ROWS_KEY in pieces:
            return tokens.make_token_node(base, pieces[tokens.LORA_ROWS_KEY], frozen)
        scaling = constants.get("scaling", jnp.float32(0.0))
        if EMB_A_KEY in pieces:
            return LoraEmbedding(base, pieces[EMB_A_KEY], pieces[EMB_B_KEY], scaling)
        use_dropout = config.lora_dropout > 0 and dropout_key is not None
        return LoraWeight(
            base=base,
            lora_A=pieces[A_KEY],
            lora_B=pieces[B_KEY],
            scaling=scaling,
            magnitude=pieces.get(MAG_KEY),
            init_A=frozen.get(A_KEY),
            init_B=frozen.get(B_KEY),
            active=active if MAG_KEY in pieces else None,
            dropout_key=dropout_key if use_dropout else None,
            dropout_rate=config.lora_dropout if use_dropout else 0.0,
        )

    def to_file(self, adapter: Adapter):
        return super().to_file(to_saved(adapter))

    def from_file(self, config, tensors, params, source: str) -> Adapter:
        adapter = from_saved(super().from_file(config, tensors, params, source), params, source)
        return tokens.token_frozen_for_file(adapter, params, config.trainable_token_indices)

    def job_fields(self, job) -> dict:
        return {"lora_dropout": job.lora_dropout}
