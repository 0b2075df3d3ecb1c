"""MiSS (matrix shard sharing, ex-Bone), with PEFT's semantics and file format.

Math (Kang and Yin 2024, https://arxiv.org/abs/2409.15371, as PEFT implements it), per targeted
linear `W` [out, in] with one trainable `miss_block`, by `init_weights`:

- True / False ("balance"), block [r, out]: dW[o, i] = block[i mod r, o], i.e.
      y = x W^T + b + (sum over the ceil(in / r) chunks of dropout(x) zero-padded) @ block
  (`miss_dropout` drops x before the chunks are summed, while training only).
- "mini", block [r, mini_r]: as balance with the block tiled along out (column o uses o mod
  mini_r); needs out % mini_r == 0.
- "bat", block [out/r, r, r]: a weight-dependent update; for every r x r block W_(a,b) of W
  (a over out/r, b over in/r), dW_(a,b) = W_(a,b) B_a + B_a, and y = x (W + dW)^T + b in float32,
  with no dropout (as PEFT); needs in % r == out % r == 0. Unmerge inverts it per block:
  W = (W' - B_a) (I + B_a)^-1.

Init, as PEFT: zeros (dW = 0) except `init_weights=False`, kaiming_uniform(a=sqrt(5)) over the
[r, out] block. A zero block (a layer the adapter does not cover in a stacked weight) changes
nothing in every variant. PEFT adapts nn.Linear only (quantized ones through its backends): on a
4-bit base, balance and mini add their change to the quantized matmul and bat dequantizes W.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.config import FrozenMap
from jpeft.method import Pieces, register
from jpeft.methods.lora_ops import dropout
from jpeft.methods.low_rank import (
    ANY,
    LowRankConfig,
    LowRankMethod,
    check_bias,
    check_regex_targets,
    kaiming_uniform,
)
from jpeft.ops import as_array, dense

BLOCK = "miss_block"
INITS = (True, False, "bat", "mini")


@dataclasses.dataclass(frozen=True)
class MissConfig(LowRankConfig):
    """PEFT's `MissConfig`: same field names, defaults and JSON. MiSS has one rank for every
    module and no alpha: the family's pattern lookups see empty patterns."""

    ALPHA_FIELD: ClassVar[str | None] = None
    DROPOUT_FIELDS: ClassVar[tuple[str, ...]] = ("miss_dropout",)
    rank_pattern: ClassVar[Mapping[str, int]] = FrozenMap()
    alpha_pattern: ClassVar[Mapping[str, float]] = FrozenMap()

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    init_weights: bool | str = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | None = None
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None

    def validate(self) -> None:
        super().validate()
        check_regex_targets(self)
        check_bias(self, "MiSS_only")
        if self.init_weights not in INITS:
            raise ValueError(
                f"MissConfig.init_weights must be True, False, 'bat' or 'mini', got "
                f"{self.init_weights!r}"
            )
        if self.init_weights == "mini" and self.mini_r <= 0:
            raise ValueError(f"MissConfig.mini_r must be a positive integer, got {self.mini_r!r}")

    @property
    def variant(self) -> str:
        """The variant: "bat", "mini", or "balance" for init_weights True or False."""
        return self.init_weights if isinstance(self.init_weights, str) else "balance"


def check_module(config: MissConfig, module: str, base_shape: tuple[int, int]) -> None:
    """ValueError naming the module, its weight's shape and the setting it does not fit, where
    PEFT's `update_layer` refuses the module."""
    out_dim, in_dim = base_shape
    problem = None
    if config.r > in_dim:
        problem = f"r={config.r} exceeds its in_features {in_dim}"
    elif config.variant == "bat" and (in_dim % config.r or out_dim % config.r):
        problem = f"init_weights='bat' needs in and out features divisible by r={config.r}"
    elif config.variant == "mini" and out_dim % config.mini_r:
        problem = f"init_weights='mini' needs out_features divisible by mini_r={config.mini_r}"
    if problem:
        raise ValueError(
            f"{module} (weight [out, in] = {list(base_shape)}) cannot take MiSS: {problem} (PEFT "
            "refuses it too); change r / mini_r or leave the module out of target_modules"
        )


def chunk_sum(x: jax.Array, rank: int) -> jax.Array:
    """`x` [..., in] zero-padded to a multiple of `rank` and its chunks of `rank` summed:
    [..., rank]."""
    padding = -x.shape[-1] % rank
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padding)])
    return x.reshape(*x.shape[:-1], -1, rank).sum(axis=-2)


def bat_blocks(weight: jax.Array, rank: int) -> jax.Array:
    """`weight` [..., out, in] as its r x r blocks [..., out/r, r, in/r, r]."""
    *lead, out_dim, in_dim = weight.shape
    return weight.reshape(*lead, out_dim // rank, rank, in_dim // rank, rank)


@dataclasses.dataclass(frozen=True)
class MissWeight:
    """A linear weight with MiSS; leaves may carry a leading stacked-layer axis [L].

    base [out, in] (an array or a 4-bit weight); block: balance [r, out], mini [r, mini_r], bat
    [out/r, r, r] (zeros on layers the adapter does not cover); dropout_key: a PRNG key while
    training with `miss_dropout` above 0, else None.
    """

    base: Any
    block: jax.Array
    dropout_key: jax.Array | None = None
    dropout_rate: float = 0.0
    variant: str = "balance"

    def shared_block(self) -> jax.Array:
        """The [..., r, out] block of balance and mini (mini's tiled along out), float32."""
        block = self.block.astype(jnp.float32)
        if self.variant == "mini":
            repeats = self.base.shape[-2] // block.shape[-1]
            block = jnp.tile(block, (1,) * (block.ndim - 1) + (repeats,))
        return block

    def delta(self) -> jax.Array:
        """dW in float32 [..., out, in]."""
        if self.variant == "bat":
            weight = as_array(self.base, jnp.float32)
            block = self.block.astype(jnp.float32)
            blocks = bat_blocks(weight, block.shape[-1])
            delta = jnp.einsum("...aibj,...ajk->...aibk", blocks, block) + block[..., None, :]
            return delta.reshape(weight.shape)
        block = self.shared_block()
        columns = jnp.arange(self.base.shape[-1]) % block.shape[-2]
        return jnp.swapaxes(jnp.take(block, columns, axis=-2), -1, -2)

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out] (one layer's slice); the adapter's part in float32."""
        f32 = jnp.float32
        if self.variant == "bat":
            weight = as_array(self.base, f32) + self.delta()
            bias = None if bias is None else bias.astype(f32)
            return dense(x.astype(f32), weight, bias).astype(x.dtype)
        y = dense(x, self.base, bias)
        block = self.shared_block()
        summed = chunk_sum(dropout(x, self.dropout_rate, self.dropout_key), block.shape[-2])
        change = dense(summed.astype(f32), jnp.swapaxes(block, -1, -2))
        return (y.astype(f32) + change).astype(x.dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError("a MiSS linear weight was used as an embedding table")

    def merged_weight(self) -> jax.Array:
        """W + dW: [..., out, in] in the base's dtype."""
        return (self.base.astype(jnp.float32) + self.delta()).astype(self.base.dtype)

    def unmerged_weight(self) -> jax.Array:
        """The weight whose merge is this one, in the base's dtype: W - dW, or for bat
        (W' - B_a) (I + B_a)^-1 per block, as PEFT's unmerge."""
        if self.variant != "bat":
            return (self.base.astype(jnp.float32) - self.delta()).astype(self.base.dtype)
        weight, block = self.base.astype(jnp.float32), self.block.astype(jnp.float32)
        inverse = jnp.linalg.inv(jnp.eye(block.shape[-1], dtype=jnp.float32) + block)
        shifted = bat_blocks(weight, block.shape[-1]) - block[..., None, :]
        original = jnp.einsum("...aibj,...ajk->...aibk", shifted, inverse)
        return original.reshape(weight.shape).astype(self.base.dtype)


jax.tree_util.register_dataclass(
    MissWeight,
    data_fields=["base", "block", "dropout_key"],
    meta_fields=["dropout_rate", "variant"],
)


@register
class Miss(LowRankMethod):
    """MiSS on linear layers."""

    peft_type = "MISS"
    name = "miss"
    config_class = MissConfig
    # PEFT's MetaMathQA runs train MiSS at LoRA's lr (1e-4). An Adam step moves every dW entry by
    # ~lr (dW is the block itself, tiled), where LoRA's dW moves by ~lr sqrt(r / (3 in)) alpha/r
    # per entry (B moves by lr, A ~ U(+-1/sqrt(in))): ~0.1 lr at the job's r=16, alpha/r=2 on a
    # 2k-wide model. A tenth of LoRA's 2e-3 gives MiSS LoRA's update size.
    default_lr = 2e-4
    job_help = "MiSS (shared blocks, balance init), r=--r, miss_dropout=--lora-dropout, all-linear"
    piece_names = (BLOCK,)
    # the balance block [r, out] follows the base's out axis (bat's 3-d block stays replicated)
    piece_axes = {BLOCK: (None, 0)}
    bias_only_value = "MiSS_only"

    def init_module(self, config: MissConfig, ref, weight, key) -> tuple[Pieces, Pieces]:
        """PEFT's init: a zero block, or kaiming_uniform over [r, out] for init_weights=False."""
        check_module(config, ref.name, tuple(ref.shape))
        shape = self.expected_shapes(config, ref.name, tuple(ref.shape), {})[BLOCK]
        if config.init_weights is False:
            return {BLOCK: kaiming_uniform(key, shape, shape[1])}, {}
        return {BLOCK: jnp.zeros(shape, jnp.float32)}, {}

    def expected_shapes(self, config: MissConfig, module: str, base_shape, pieces):
        """{miss_block: its shape} for a weight [out, in] (out may be `ANY`)."""
        out_dim, rank = base_shape[0], config.r
        if config.variant == "bat":
            return {BLOCK: (ANY if out_dim is ANY else out_dim // rank, rank, rank)}
        if config.variant == "mini":
            return {BLOCK: (rank, config.mini_r)}
        return {BLOCK: (rank, out_dim)}

    def check_shapes(self, config: MissConfig, module: str, base_shape, pieces) -> None:
        check_module(config, module, tuple(base_shape))
        super().check_shapes(config, module, base_shape, pieces)

    def module_constants(self, config: MissConfig, module: str, pieces: Pieces) -> dict:
        return {}

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        use_dropout = config.miss_dropout > 0 and dropout_key is not None
        return MissWeight(
            base=base,
            block=pieces[BLOCK],
            dropout_key=dropout_key if use_dropout else None,
            dropout_rate=config.miss_dropout if use_dropout else 0.0,
            variant=config.variant,
        )

    def job_fields(self, job) -> dict[str, Any]:
        """`--lora-dropout` is MiSS's input dropout (`--lora-alpha` is unused)."""
        return {"miss_dropout": job.lora_dropout}
