"""LoHa (low-rank Hadamard product), with PEFT's semantics and file format; also what the LyCORIS
methods (LoHa, LoKr) share: their config fields, the refusal of 4-bit bases, their dropouts and
their node's linear op, as PEFT shares `tuners/lycoris_utils.py`.

Math (FedPara, Hyeon-Woo et al. 2022, https://arxiv.org/abs/2108.06098, as LyCORIS and PEFT
implement it), per targeted linear `W` [out, in]:

    dW = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / r,   w1_a, w2_a [out, r]; w1_b, w2_b [r, in]
    y  = x W^T + b + x dW^T

As in PEFT, dW is formed in full on every call and the base matmul is a separate `dense`, so the
frozen W never gets a gradient. While training (a dropout key is given), PEFT's two dropouts:
`module_dropout` skips the whole adapter with probability p (no rescaling), and `rank_dropout`
zeroes each output row of dW with probability p, the kept rows divided by the kept fraction
(always in LoHa; LoKr only with `rank_dropout_scale`).

PEFT adds LoHa to nn.Linear and convolutions only: embedding tables are refused, and so are
4-bit (bitsandbytes) bases, on which PEFT's LoHa forward fails.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.adapter import Adapter
from jpeft.method import Pieces, register
from jpeft.methods import common
from jpeft.methods.low_rank import LowRankConfig, LowRankMethod, kaiming_uniform
from jpeft.ops import dense
from jpeft.quant import QuantizedTensor

W1_A, W1_B, W2_A, W2_B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"


@dataclasses.dataclass(frozen=True)
class LycorisConfig(LowRankConfig):
    """The fields PEFT's `LoHaConfig` and `LoKrConfig` share, with PEFT's defaults.

    `use_effective_conv2d` concerns convolutions only (jpeft has none); it is kept for the JSON.
    """

    ALPHA_FIELD: ClassVar[str] = "alpha"
    DROPOUT_FIELDS: ClassVar[tuple[str, ...]] = ("rank_dropout", "module_dropout")

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Any = None
    exclude_modules: Any = None
    init_weights: bool | str = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LoHaConfig(LycorisConfig):
    """PEFT's `LoHaConfig`: same field names, defaults and JSON."""

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.init_weights, bool):
            raise ValueError(
                f"LoHaConfig.init_weights must be True or False, got {self.init_weights!r}"
            )


def refuse_quantized(method: str, weight: Any, module: str | None = None) -> None:
    """ValueError when `weight` is a 4-bit quantized base. PEFT has no 4-bit LoHa/LoKr layer: it
    wraps a bitsandbytes `Linear4bit` as a plain nn.Linear, and the forward then fails on the
    packed weight's shape (PEFT 0.21.2: "mat1 and mat2 shapes cannot be multiplied")."""
    if isinstance(weight, QuantizedTensor):
        where = module or f"a weight of shape {tuple(weight.shape)}"
        raise ValueError(
            f"{method} cannot adapt {where}: it is a 4-bit quantized weight, and PEFT has no "
            f"4-bit {method} layer (its {method} forward fails on bitsandbytes layers). Load the "
            "base unquantized, or use LoRA (QLoRA) on a 4-bit base"
        )


def lycoris_dropout(
    delta: jax.Array, key: jax.Array, rank_rate: float, module_rate: float, renormalise: bool
) -> jax.Array:
    """PEFT's training-time dropouts on one layer's dW [out, in] (float32).

    rank dropout: each output row is kept when U[0, 1) > rank_rate; with `renormalise` the mask
    is divided by its mean (a mask with no kept row stays 0, where PEFT's 0 / 0 gives NaN).
    module dropout: the whole dW is kept when U[0, 1) > module_rate, else zero (no rescaling).
    """
    rank_key, module_key = jax.random.split(key)
    if rank_rate > 0:
        mask = (jax.random.uniform(rank_key, delta.shape[:1]) > rank_rate).astype(delta.dtype)
        if renormalise:
            mask = mask / jnp.maximum(jnp.mean(mask), 1e-12)
        delta = delta * mask[:, None]
    if module_rate > 0:
        keep = jax.random.uniform(module_key, ()) > module_rate
        delta = jnp.where(keep, delta, jnp.zeros((), delta.dtype))
    return delta


class LycorisNode:
    """The linear op, merge and unmerge of a LyCORIS node; subclasses define `delta()`.

    A subclass is a registered dataclass with `base` [..., out, in], `scaling` [...],
    `dropout_key` (a PRNG key while training with a dropout, else None) and the static
    `rank_dropout`, `module_dropout` and `renormalise` (divide the rank mask by its mean).
    """

    base: jax.Array
    dropout_key: jax.Array | None
    rank_dropout: float
    module_dropout: float
    renormalise: bool

    def delta(self) -> jax.Array:
        """dW in float32: [..., out, in]."""
        raise NotImplementedError

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out] (one layer's slice): x W^T + b + x dW^T."""
        delta = self.delta()
        if self.dropout_key is not None:
            delta = lycoris_dropout(
                delta, self.dropout_key, self.rank_dropout, self.module_dropout, self.renormalise
            )
        return dense(x, self.base, bias) + dense(x, delta)

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError(f"a {type(self).__name__} linear weight was used as an embedding table")

    def merged_weight(self) -> jax.Array:
        """W + dW: [..., out, in] in the base's dtype."""
        return (self.base.astype(jnp.float32) + self.delta()).astype(self.base.dtype)

    def unmerged_weight(self) -> jax.Array:
        """W - dW: [..., out, in] in the base's dtype (PEFT's unmerge recomputes dW too)."""
        return (self.base.astype(jnp.float32) - self.delta()).astype(self.base.dtype)


@dataclasses.dataclass(frozen=True)
class LoHaWeight(LycorisNode):
    """A linear weight with LoHa; leaves may carry a leading stacked-layer axis [L].

    base [out, in]; w1_a, w2_a [out, r]; w1_b, w2_b [r, in] (zero-padded ranks, zeros on layers
    the adapter does not cover); scaling [] alpha / r (0 on uncovered layers).
    """

    base: jax.Array
    w1_a: jax.Array
    w1_b: jax.Array
    w2_a: jax.Array
    w2_b: jax.Array
    scaling: jax.Array
    dropout_key: jax.Array | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    renormalise: bool = True

    def delta(self) -> jax.Array:
        f32 = jnp.float32
        w1 = jnp.einsum("...or,...ri->...oi", self.w1_a.astype(f32), self.w1_b.astype(f32))
        w2 = jnp.einsum("...or,...ri->...oi", self.w2_a.astype(f32), self.w2_b.astype(f32))
        return w1 * w2 * jnp.asarray(self.scaling, f32)[..., None, None]


jax.tree_util.register_dataclass(
    LoHaWeight,
    data_fields=["base", "w1_a", "w1_b", "w2_a", "w2_b", "scaling", "dropout_key"],
    meta_fields=["rank_dropout", "module_dropout", "renormalise"],
)


def dropout_fields(config: LycorisConfig, dropout_key: jax.Array | None) -> dict[str, Any]:
    """The node's dropout fields: a key only while training with a dropout rate above 0."""
    if dropout_key is None or (config.rank_dropout == 0 and config.module_dropout == 0):
        return {"dropout_key": None}
    return {
        "dropout_key": dropout_key,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
    }


class LycorisMethod(LowRankMethod):
    """What LoHa and LoKr share: a per-module `layout` ({piece: shape}) drives the init, the
    expected shapes and the piece-set check; 4-bit bases are refused."""

    @abstractmethod
    def layout(
        self, config: LycorisConfig, module: str, base_shape: tuple[int, ...]
    ) -> dict[str, tuple[int, ...]]:
        """{piece: shape} PEFT creates for `module` with a base weight [out, in]."""

    def expected_shapes(self, config, module: str, base_shape, pieces):
        return self.layout(config, module, base_shape)

    def check_shapes(self, config, module: str, base_shape, pieces) -> None:
        """The piece names PEFT would create for this config (ValueError naming the module, both
        sets and the config), then their shapes (rank included, as PEFT's load checks)."""
        want = self.layout(config, module, tuple(base_shape))
        if set(pieces) != set(want):
            raise ValueError(
                f"{module}: the adapter holds pieces {sorted(pieces)}, but {type(config).__name__}"
                f"(r={config.rank_for(module)}, ...) gives a weight of shape {tuple(base_shape)} "
                f"the pieces {sorted(want)}; was the adapter saved with another config or model?"
            )
        super().check_shapes(config, module, base_shape, pieces)

    def init_adapter(self, params, config: LycorisConfig, key, model=None) -> Adapter:
        """As the family's, with PEFT's default targets written into the config when
        `target_modules` is None (PEFT saves the resolved names in adapter_config.json)."""
        defaults = self.default_targets.get(common.model_type_of(model))
        if config.target_modules is None and defaults is not None:
            config = config.replace(target_modules=tuple(defaults))
        return super().init_adapter(params, config, key, model)

    def init_module(self, config: LycorisConfig, ref, weight, key) -> tuple[Pieces, Pieces]:
        refuse_quantized(type(self).__name__, weight, ref.name)
        shapes = self.layout(config, ref.name, tuple(ref.shape))
        zeros = self.zero_pieces(config, shapes)
        keys = jax.random.split(key, len(shapes))
        pieces = {
            piece: jnp.zeros(shape, jnp.float32)
            if piece in zeros
            else kaiming_uniform(k, shape, shape[1])
            for (piece, shape), k in zip(shapes.items(), keys, strict=True)
        }
        return pieces, {}

    @abstractmethod
    def zero_pieces(self, config: LycorisConfig, shapes: Mapping[str, tuple]) -> tuple[str, ...]:
        """The pieces PEFT initialises to zeros (the others: kaiming_uniform(a=sqrt(5)), i.e.
        U(+-1/sqrt(fan_in)) with fan_in the second dim)."""

    def job_fields(self, job) -> dict:
        """`--lora-dropout` is the adapter's dropout: LyCORIS's rank dropout."""
        return {"rank_dropout": job.lora_dropout}


@register
class LoHa(LycorisMethod):
    """LoHa on linear layers."""

    peft_type = "LOHA"
    name = "loha"
    config_class = LoHaConfig
    # LoRA's job uses 2e-3. LoHa starts slower: w2_b starts at 0, so a first Adam step (size lr)
    # moves dW by ~ lr / (3 sqrt(3 in)) * alpha/r per entry (|w1_a @ w1_b| ~ 1 / (3 sqrt(in)),
    # w2_a ~ U(+-1/sqrt(r)) summed over r), 3 sqrt(r) times less than LoRA's
    # lr sqrt(r / (3 in)) * alpha/r (12x at the job's r=16); PEFT's MetaMathQA benchmark also saw
    # LoHa lag LoRA at LoRA's lr. Doubling the lr lets it catch up within 80 steps, while dW, a
    # product of two factors that both grow, stays near LoRA's update size by the end.
    default_lr = 4e-3
    job_help = "LoHa, r=--r, alpha=--lora-alpha, rank_dropout=--lora-dropout, all-linear on top"
    piece_names = (W1_A, W1_B, W2_A, W2_B)
    # w*_a [out, r] follow the base's out axis, w*_b [r, in] its in axis
    piece_axes = {W1_A: (0, None), W1_B: (None, 1), W2_A: (0, None), W2_B: (None, 1)}

    def layout(self, config: LoHaConfig, module: str, base_shape):
        out_dim, in_dim = base_shape
        rank = config.rank_for(module)
        return {
            W1_A: (out_dim, rank),
            W1_B: (rank, in_dim),
            W2_A: (out_dim, rank),
            W2_B: (rank, in_dim),
        }

    def zero_pieces(self, config: LoHaConfig, shapes):
        return (W2_B,) if config.init_weights else ()

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        refuse_quantized("LoHa", base)
        return LoHaWeight(
            base=base,
            w1_a=pieces[W1_A],
            w1_b=pieces[W1_B],
            w2_a=pieces[W2_A],
            w2_b=pieces[W2_B],
            scaling=constants.get("scaling", jnp.float32(0.0)),
            **dropout_fields(config, dropout_key),
        )
