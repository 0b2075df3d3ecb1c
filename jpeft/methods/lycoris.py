"""What PEFT's LyCORIS methods (LoHa, LoKr) share, as PEFT shares `tuners/lycoris_utils.py`:
their config fields, the refusal of 4-bit bases, their training-time dropouts, their node's
linear op and merge, and a method base whose per-module `layout` drives init and shape checks.

Both form dW from their pieces on every call and run `y = x W^T + b + x dW^T`, the base matmul a
separate `dense`, so the frozen W never gets a gradient. While training (a dropout key is given),
PEFT's two dropouts: `module_dropout` skips the whole adapter with probability p (no rescaling),
and `rank_dropout` zeroes each output row of dW with probability p, the kept rows divided by the
kept fraction (always in LoHa; LoKr only with `rank_dropout_scale`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.method import Pieces
from jpeft.methods.low_rank import LowRankConfig, LowRankMethod, kaiming_uniform
from jpeft.ops import dense
from jpeft.quant import QuantizedTensor


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
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    init_weights: bool | str = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None
    rank_pattern: Mapping[str, int] | None = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] | None = dataclasses.field(default_factory=dict)


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


class LycorisNode(ABC):
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

    @abstractmethod
    def delta(self) -> jax.Array:
        """dW in float32: [..., out, in]."""

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out] (one layer's slice): x W^T + b + x dW^T.

        In float32 it runs as one matmul, x (W + dW)^T: one weight-sized matmul fewer forward
        and in the input gradient than PEFT's two (the same sum up to float rounding; the
        gradient reaching dW is the same g^T x, and W, a plain input, gets none). In a lower
        precision the two products stay separate, so W + dW is never rounded to it.
        """
        delta = self.delta()
        if self.dropout_key is not None:
            delta = lycoris_dropout(
                delta, self.dropout_key, self.rank_dropout, self.module_dropout, self.renormalise
            )
        if x.dtype == jnp.float32:
            return dense(x, self.base.astype(jnp.float32) + delta, bias)
        return dense(x, self.base, bias) + dense(x, delta)

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError(f"a {type(self).__name__} linear weight was used as an embedding table")

    def merged_weight(self) -> jax.Array:
        """W + dW: [..., out, in] in the base's dtype."""
        return (self.base.astype(jnp.float32) + self.delta()).astype(self.base.dtype)

    def unmerged_weight(self) -> jax.Array:
        """W - dW: [..., out, in] in the base's dtype (PEFT's unmerge recomputes dW too)."""
        return (self.base.astype(jnp.float32) - self.delta()).astype(self.base.dtype)


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
