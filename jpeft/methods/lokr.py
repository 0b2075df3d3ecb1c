"""LoKr (low-rank Kronecker product), with PEFT's semantics and file format.

Math (KronA, Edalati et al. 2022, https://arxiv.org/abs/2212.10650, and LyCORIS, Yeh et al.
2023, https://arxiv.org/abs/2309.14859, as PEFT implements them), per targeted linear `W`
[out, in] with out = o1 * o2 and in = i1 * i2 split by `factorization`:

    w1 [o1, i1] = lokr_w1, or lokr_w1_a [o1, r] @ lokr_w1_b [r, i1]
    w2 [o2, i2] = lokr_w2, or lokr_w2_a [o2, r] @ lokr_w2_b [r, i2]
    dW = kron(w1, w2) * alpha / r        (the scale applies to full factors too, as in PEFT)
    y  = x W^T + b + x dW^T

PEFT's rules pick the pieces: w1 is factored only with `decompose_both` and
r < max(o1, i1) / 2, w2 whenever r < max(o2, i2) / 2. Dropouts as in LoHa (see
`jpeft.methods.loha`), except that the rank-dropout mask is divided by its mean only with
`rank_dropout_scale`.

jpeft runs a module's stacked layers as one op, so every layer of a module must have the same
piece names; a `rank_pattern` that makes w2 full in some layers and factored in others is
refused with the module named.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter import Adapter
from jpeft.method import register
from jpeft.methods.lycoris import (
    LycorisConfig,
    LycorisMethod,
    LycorisNode,
    dropout_fields,
    refuse_quantized,
)
from jpeft.tree import STACKED_KEY

W1, W1_A, W1_B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
W2, W2_A, W2_B = "lokr_w2", "lokr_w2_a", "lokr_w2_b"


@dataclasses.dataclass(frozen=True)
class LoKrConfig(LycorisConfig):
    """PEFT's `LoKrConfig`: same field names, defaults and JSON."""

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            raise ValueError(
                f"LoKrConfig.init_weights must be True, False or 'lycoris', got "
                f"{self.init_weights!r}"
            )


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of `dimension` into m * n, as PEFT's `lokr.layer.factorization`.

    A positive `factor` that divides `dimension` gives (factor, dimension // factor) as is, so m
    may exceed n: (64, 16) -> (16, 4). Otherwise m walks up the divisors of `dimension` from 1
    while m < n and the next divisor is at most the limit (`dimension` for factor -1, else
    `factor`; a factor of 0 or below -1 keeps m = 1), and the pair is returned smaller first:
    4096 -> (64, 64), 3072 -> (48, 64), (100, 3) -> (2, 50), 127 -> (1, 127).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        step = m + 1
        while dimension % step:
            step += 1
        if step > limit:
            break
        m, n = step, dimension // step
    return min(m, n), max(m, n)


@dataclasses.dataclass(frozen=True)
class LoKrWeight(LycorisNode):
    """A linear weight with LoKr; leaves may carry a leading stacked-layer axis [L].

    base [out, in]; w1 [o1, i1] (or w1_a [o1, r], w1_b [r, i1]); w2 [o2, i2] (or w2_a [o2, r],
    w2_b [r, i2]); unused pieces None; ranks zero-padded and zeros on layers the adapter does not
    cover; scaling [] alpha / r (0 on uncovered layers).
    """

    base: jax.Array
    scaling: jax.Array
    w1: jax.Array | None = None
    w1_a: jax.Array | None = None
    w1_b: jax.Array | None = None
    w2: jax.Array | None = None
    w2_a: jax.Array | None = None
    w2_b: jax.Array | None = None
    dropout_key: jax.Array | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    renormalise: bool = False

    def delta(self) -> jax.Array:
        w1 = _factor(self.w1, self.w1_a, self.w1_b)
        w2 = _factor(self.w2, self.w2_a, self.w2_b)
        (o1, i1), (o2, i2) = w1.shape[-2:], w2.shape[-2:]
        kron = jnp.einsum("...ab,...cd->...acbd", w1, w2)  # [..., o1, o2, i1, i2]
        kron = kron.reshape(*w1.shape[:-2], o1 * o2, i1 * i2)
        return kron * jnp.asarray(self.scaling, jnp.float32)[..., None, None]


def _factor(full, a, b) -> jax.Array:
    """A Kronecker factor in float32: `full`, or a @ b."""
    if full is not None:
        return full.astype(jnp.float32)
    return jnp.einsum("...xr,...ry->...xy", a.astype(jnp.float32), b.astype(jnp.float32))


jax.tree_util.register_dataclass(
    LoKrWeight,
    data_fields=["base", "scaling", "w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "dropout_key"],
    meta_fields=["rank_dropout", "module_dropout", "renormalise"],
)


def factor_shape(module: str, pieces, full: str, a: str, b: str) -> tuple[int, int]:
    """[o, i] of a Kronecker factor in a file: the shape of `full`, or of `a` [o, r] @ `b` [r, i];
    ValueError naming the module when the pieces form neither."""
    shapes = {piece: np.shape(pieces[piece]) for piece in (full, a, b) if piece in pieces}
    if len(shapes.get(full, ())) == 2:
        return shapes[full]
    if len(shapes.get(a, ())) == 2 and len(shapes.get(b, ())) == 2:
        return shapes[a][0], shapes[b][1]
    raise ValueError(
        f"{module}: a LoKr factor is {full} [o, i] or {a} [o, r] with {b} [r, i], but the file "
        f"holds {shapes or 'none of them'}"
    )


def stacked_name(module: str) -> str:
    """The module a per-layer name runs in, jpeft stacking the layers under `layers`:
    `model.layers.3.mlp.up_proj` -> `model.layers.mlp.up_proj`."""
    parts = module.split(".")
    return ".".join(
        p for i, p in enumerate(parts) if not (p.isdigit() and i and parts[i - 1] == STACKED_KEY)
    )


def check_uniform_pieces(adapter: Adapter) -> None:
    """ValueError naming the module when its stacked layers hold different piece names."""
    groups: dict[str, dict[tuple[str, ...], list[str]]] = {}
    for name, pieces in adapter.weights.items():
        by_set = groups.setdefault(stacked_name(name), {})
        by_set.setdefault(tuple(sorted(pieces)), []).append(name)
    for module, by_set in groups.items():
        if len(by_set) > 1:
            shown = "; ".join(f"{list(s)} in {names}" for s, names in by_set.items())
            raise ValueError(
                f"{module}: its layers have different LoKr pieces ({shown}). PEFT picks a full or "
                "factored w1/w2 per layer from its rank (r < max(dims) / 2 factors it), so a "
                "rank_pattern can split them; jpeft runs a module's stacked layers as one op and "
                "needs the same pieces in every layer. Choose ranks on the same side of the "
                "threshold for all layers of this module"
            )


@register
class LoKr(LycorisMethod):
    """LoKr on linear layers."""

    peft_type = "LOKR"
    name = "lokr"
    config_class = LoKrConfig
    # LoRA's job uses 2e-3. With the job's r=16 on SmolLM2's 576 x 576 projections
    # (576 = 24 * 24), w1 and w2 are full [24, 24] factors: a first Adam step on the zero w1 moves
    # dW about as much as LoRA's (~0.24 vs ~0.19 lr * alpha/r per entry), but LoKr trains ~1,150
    # numbers there (LoRA ~18,400), and PEFT's MetaMathQA benchmark runs LoKr at a much higher lr
    # than LoRA. 2.5x LoRA's lr gives the few numbers room to move while keeping each step's
    # change to dW moderate.
    default_lr = 5e-3
    job_help = "LoKr, r=--r, alpha=--lora-alpha, rank_dropout=--lora-dropout, all-linear on top"
    piece_names = (W1, W1_A, W1_B, W2, W2_A, W2_B)
    # Kronecker factors run along out = o1 * o2 and in = i1 * i2, not along a base axis:
    # replicated (they are small).
    piece_axes = {}

    def layout(self, config: LoKrConfig, module: str, base_shape):
        out_dim, in_dim = base_shape
        rank = config.rank_for(module)
        o1, o2 = factorization(out_dim, config.decompose_factor)
        i1, i2 = factorization(in_dim, config.decompose_factor)
        shapes = {}
        if config.decompose_both and rank < max(o1, i1) / 2:
            shapes.update({W1_A: (o1, rank), W1_B: (rank, i1)})
        else:
            shapes[W1] = (o1, i1)
        if rank < max(o2, i2) / 2:
            shapes.update({W2_A: (o2, rank), W2_B: (rank, i2)})
        else:
            shapes[W2] = (o2, i2)
        return shapes

    def file_shapes(self, config: LoKrConfig, module: str, pieces):
        """`layout` for the base weight the factors span: [o1 * o2, i1 * i2] (a file does not
        say the base's size, but LoKr's factors do)."""
        (o1, i1), (o2, i2) = (
            factor_shape(module, pieces, full, a, b)
            for full, a, b in ((W1, W1_A, W1_B), (W2, W2_A, W2_B))
        )
        return self.layout(config, module, (o1 * o2, i1 * i2))

    def zero_pieces(self, config: LoKrConfig, shapes):
        if config.init_weights == "lycoris":
            return (W2, W2_B)
        return (W1, W1_A) if config.init_weights else ()

    def init_adapter(self, params, config: LoKrConfig, key, model=None) -> Adapter:
        adapter = super().init_adapter(params, config, key, model)
        check_uniform_pieces(adapter)
        return adapter

    def from_file(self, config, tensors, params, source: str) -> Adapter:
        adapter = super().from_file(config, tensors, params, source)
        check_uniform_pieces(adapter)
        return adapter

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        refuse_quantized("LoKr", base)
        return LoKrWeight(
            base=base,
            scaling=constants.get("scaling", jnp.float32(0.0)),
            w1=pieces.get(W1),
            w1_a=pieces.get(W1_A),
            w1_b=pieces.get(W1_B),
            w2=pieces.get(W2),
            w2_a=pieces.get(W2_A),
            w2_b=pieces.get(W2_B),
            renormalise=config.rank_dropout_scale,
            **dropout_fields(config, dropout_key),
        )
