"""HRA (Householder reflection adaptation), with PEFT's semantics and file format.

Math (Yuan et al. 2024, https://arxiv.org/abs/2405.17484, as PEFT implements it), per targeted
linear `W` [out, in] with `hra_u` [in, r], its columns normalised to unit u_i:

    H  = (I - 2 u_0 u_0^T) (I - 2 u_1 u_1^T) ... (I - 2 u_{r-1} u_{r-1}^T)
    y  = x (W H)^T + b

With `apply_GS`, the columns are first orthonormalised by (modified) Gram-Schmidt into Q, and
H = I - 2 Q Q^T. Merge folds W H into the weight; unmerge multiplies by the reflections in
reverse order (H^-1 = H^T; with `apply_GS` H is its own inverse), as PEFT does. As in PEFT, the
adapted weight is formed in float32 on every call (x and the bias are cast to it, the output back
to x's dtype); jpeft applies the reflections to W one at a time (out x in per reflection) instead
of building the in x in matrix H.

Init, as PEFT: with `init_weights` and an even r, r/2 kaiming-uniform columns each repeated twice,
so the reflections cancel in pairs and H = I; with an odd r (PEFT warns) or `init_weights=False`,
r kaiming-uniform columns: the adapter changes the model from the start. With `apply_GS`, PEFT's
Gram-Schmidt of two equal columns normalises their rounding noise, so its even-r start is not the
identity either (nor jpeft's, whose rounding differs); once trained the columns differ and both
agree.

PEFT adapts nn.Linear and Conv2d only: embedding tables are refused, and so are 4-bit bases
(PEFT has no quantized HRA layer). PEFT does not implement the paper's orthogonality regulariser,
and neither does jpeft. A zero column (a layer the adapter does not cover in a stacked weight)
is the identity here, where PEFT's normalisation would divide by zero.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.config import FrozenMap
from jpeft.method import JobOptionError, Pieces, register
from jpeft.methods.low_rank import (
    LowRankConfig,
    LowRankMethod,
    check_bias,
    check_regex_targets,
    kaiming_uniform,
)
from jpeft.methods.lycoris import refuse_quantized
from jpeft.ops import dense

HRA_U = "hra_u"


@dataclasses.dataclass(frozen=True)
class HRAConfig(LowRankConfig):
    """PEFT's `HRAConfig`: same field names, defaults and JSON. HRA has one rank for every module
    and no alpha: the family's pattern lookups see empty patterns, so every module gets `r`."""

    ALPHA_FIELD: ClassVar[str | None] = None
    rank_pattern: ClassVar[Mapping[str, int]] = FrozenMap()
    alpha_pattern: ClassVar[Mapping[str, float]] = FrozenMap()

    r: int = 8
    apply_GS: bool = False
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None

    def validate(self) -> None:
        super().validate()
        check_regex_targets(self)
        check_bias(self, "hra_only")


def unit_columns(u: jax.Array) -> jax.Array:
    """`u` [..., in, r] with each column divided by its norm (a zero column stays zero)."""
    norm = jnp.linalg.norm(u, axis=-2, keepdims=True)
    return u / jnp.where(norm > 0, norm, 1.0)


def gram_schmidt(u: jax.Array) -> jax.Array:
    """PEFT's Gram-Schmidt of the columns of `u` [..., in, r] -> Q [..., in, r]: column j is
    normalised, then its projection subtracted from every later column. Each column meets the
    projections on the earlier ones in the same order as in PEFT's loop (modified Gram-Schmidt),
    in one pass over the columns."""
    rank = u.shape[-1]

    def step(v, j):
        q = unit_columns(jnp.take(v, j, axis=-1)[..., None])
        later = (jnp.arange(rank) > j).astype(v.dtype)
        v = v - q * (jnp.sum(q * v, axis=-2, keepdims=True) * later)
        return jax.lax.dynamic_update_slice_in_dim(v, q, j, axis=-1), None

    q, _ = jax.lax.scan(step, u, jnp.arange(rank))
    return q


def reflect(weight: jax.Array, columns: jax.Array, reverse: bool = False) -> jax.Array:
    """`weight` [..., out, in] times (I - 2 c c^T) for each unit column c of `columns`
    [..., in, r], in order (or in reverse order)."""

    def step(w, c):
        return w - 2 * jnp.einsum("...oi,...i->...o", w, c)[..., None] * c[..., None, :], None

    weight, _ = jax.lax.scan(step, weight, jnp.moveaxis(columns, -1, 0), reverse=reverse)
    return weight


@dataclasses.dataclass(frozen=True)
class HRAWeight:
    """A linear weight with HRA; leaves may carry a leading stacked-layer axis [L].

    base [out, in]; u [in, r] (zeros on layers the adapter does not cover: H = I there).
    """

    base: jax.Array
    u: jax.Array
    apply_gs: bool = False

    def adapted(self, reverse: bool = False) -> jax.Array:
        """W H (W H^T with `reverse`) in float32: [..., out, in]."""
        weight, u = self.base.astype(jnp.float32), self.u.astype(jnp.float32)
        if self.apply_gs:  # H = I - 2 Q Q^T: symmetric, its own inverse
            q = gram_schmidt(u)
            return weight - 2 * jnp.einsum("...oi,...ir,...jr->...oj", weight, q, q)
        return reflect(weight, unit_columns(u), reverse)

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out] (one layer's slice): x (W H)^T + b in float32, as PEFT."""
        f32 = jnp.float32
        bias = None if bias is None else bias.astype(f32)
        return dense(x.astype(f32), self.adapted(), bias).astype(x.dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError("an HRA linear weight was used as an embedding table")

    def merged_weight(self) -> jax.Array:
        """W H: [..., out, in] in the base's dtype."""
        return self.adapted().astype(self.base.dtype)

    def unmerged_weight(self) -> jax.Array:
        """W H^-1 (the reflections in reverse order, as PEFT's unmerge) in the base's dtype."""
        return self.adapted(reverse=True).astype(self.base.dtype)


jax.tree_util.register_dataclass(HRAWeight, data_fields=["base", "u"], meta_fields=["apply_gs"])


@register
class HRA(LowRankMethod):
    """HRA on linear layers."""

    peft_type = "HRA"
    name = "hra"
    config_class = HRAConfig
    # PEFT's MetaMathQA benchmark has no HRA run. H depends on the directions of u only: with the
    # job's r=16 a column's entries start at U(+-1/sqrt(8)) (norm ~ sqrt(in / 24)), so an Adam
    # step of lr per entry turns a column by ~ lr sqrt(24) radians, and W H moves by ~ 2 lr
    # sqrt(24) |W| per reflection pair: near LoRA's 2e-3 first-step size at 1e-3.
    default_lr = 1e-3
    job_help = "HRA (Householder reflections), r=--r (even: identity start), all-linear on top"
    piece_names = (HRA_U,)
    # hra_u [in, r] follows the base's in axis
    piece_axes = {HRA_U: (1, None)}
    bias_only_value = "hra_only"

    def init_adapter(self, params, config: HRAConfig, key, model=None):
        """The family's init loop; PEFT's warning (once per adapter here) for an odd r."""
        if config.init_weights and config.r % 2:
            warnings.warn(
                f"HRA r={config.r} is odd: the symmetric initialization can NOT be performed when "
                "r is odd (PEFT's warning), so the adapter starts from random reflections, not "
                "the base model; use an even r for an identity start",
                stacklevel=2,
            )
        return super().init_adapter(params, config, key, model)

    def init_module(self, config: HRAConfig, ref, weight, key) -> tuple[Pieces, Pieces]:
        """PEFT's init: pairs of equal kaiming columns (H = I) for `init_weights` and an even r,
        else r kaiming columns (fan_in = the number of columns drawn)."""
        refuse_quantized("HRA", weight, ref.name)
        in_dim, rank = ref.shape[1], config.r
        if config.init_weights and rank % 2 == 0:
            half = kaiming_uniform(key, (in_dim, rank // 2), rank // 2)
            return {HRA_U: jnp.repeat(half, 2, axis=1)}, {}
        return {HRA_U: kaiming_uniform(key, (in_dim, rank), rank)}, {}

    def expected_shapes(self, config: HRAConfig, module: str, base_shape, pieces):
        return {HRA_U: (base_shape[1], config.r)}

    def module_constants(self, config: HRAConfig, module: str, pieces: Pieces) -> dict:
        return {}

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        refuse_quantized("HRA", base)
        return HRAWeight(base=base, u=pieces[HRA_U], apply_gs=config.apply_GS)

    def job_fields(self, job) -> dict[str, Any]:
        """HRA has no dropout: `--lora-dropout` above 0 is refused (`--lora-alpha` is unused)."""
        if job.lora_dropout:
            raise JobOptionError(
                f"--lora-dropout {job.lora_dropout}: HRA has no dropout; leave it at 0"
            )
        return {}
