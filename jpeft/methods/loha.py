"""LoHa (low-rank Hadamard product), with PEFT's semantics and file format (what it shares with
LoKr is in `jpeft.methods.lycoris`).

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

import jax
import jax.numpy as jnp

from jpeft.method import register
from jpeft.methods.lycoris import (
    LycorisConfig,
    LycorisMethod,
    LycorisNode,
    dropout_fields,
    refuse_quantized,
)

W1_A, W1_B, W2_A, W2_B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"


@dataclasses.dataclass(frozen=True)
class LoHaConfig(LycorisConfig):
    """PEFT's `LoHaConfig`: same field names, defaults and JSON."""

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.init_weights, bool):
            raise ValueError(
                f"LoHaConfig.init_weights must be True or False, got {self.init_weights!r}"
            )


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
