"""BOFT (butterfly orthogonal finetuning), with PEFT 0.21.2's semantics and file format.

Math (Liu et al. 2024, https://arxiv.org/abs/2311.06243, as PEFT implements it), per targeted
linear `W` [out, in] with `levels` butterfly factors (m = levels - 1) of `nb` blocks of size `b`
(nb * b = in):

    S       = (R - R^T) / 2                        per block of boft_R [levels, nb, b, b]
    Q       = (I - S)(I + S)^-1                    exact Cayley (OFT's `cayley`, exact branch)
    M_i     = P_i blockdiag(Q_i,0 .. Q_i,nb-1) P_i^T    P_i from `block_butterfly_perm`; P_0 = I
    R_tot   = M_m ... M_1 M_0
    y       = (x R_tot) W^T * s + bias              boft_s [out, 1]; the bias is not scaled

`x R_tot` runs level by level as a gather, a batched block matmul and a gather: no [in, in]
matrix is formed. Merge: W' = W R_tot^T * s (rows scaled); unmerge: W = W' R_tot / s, as PEFT.
While training, `boft_dropout` = p replaces floor(p * nb) random blocks of one random level by
the identity, without rescaling (PEFT's `MultiplicativeDropoutLayer`).

Butterfly levels: PEFT builds `boft_n_butterfly_factor` levels only when its CUDA extension
`fbd_cuda` compiles; otherwise (any CPU machine) `update_layer` sets the factor to 1 before its
checks, with a warning, and saves boft_R [1, nb, b, b] under a config that still says the
factor. jpeft computes every level on any device: a new adapter gets the config's factor, and a
file's adapter the levels its boft_R holds (1, or the config's factor).

Linear layers only (PEFT's Conv2d BOFT has no jpeft counterpart). A 4-bit base works as in
PEFT's quantized layers: the input is rotated and the base runs as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.method import JobSpec, Pieces, register
from jpeft.methods.low_rank import ANY, LowRankConfig, LowRankMethod
from jpeft.methods.oft import cayley
from jpeft.ops import dense

BOFT_R = "boft_R"
BOFT_S = "boft_s"


@dataclasses.dataclass(frozen=True)
class BOFTConfig(LowRankConfig):
    """PEFT's `BOFTConfig`: same field names, defaults and JSON."""

    ALPHA_FIELD: ClassVar[str | None] = None
    RANK_FIELD: ClassVar[str] = "boft_block_size"

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "boft_only"] = "none"
    modules_to_save: Sequence[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None

    def validate(self) -> None:
        """PEFT's checks: exactly one of boft_block_size / boft_block_num non-zero, a butterfly
        factor >= 1 (PEFT's CUDA path; its CPU path replaces any factor by 1); sizes that PEFT
        crashes on (negative, dropout outside [0, 1]) are refused too."""
        for field in ("boft_block_size", "boft_block_num"):
            if getattr(self, field) < 0:
                raise ValueError(f"BOFTConfig.{field} must be >= 0, got {getattr(self, field)}")
        if (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise ValueError(
                f"BOFTConfig needs exactly one of boft_block_size ({self.boft_block_size}) and "
                f"boft_block_num ({self.boft_block_num}) non-zero, as boft_block_size x "
                "boft_block_num = in_features; set the other to 0"
            )
        if self.boft_n_butterfly_factor < 1:
            raise ValueError(
                "BOFTConfig.boft_n_butterfly_factor must be a positive integer (1 is plain OFT), "
                f"got {self.boft_n_butterfly_factor}"
            )
        if not 0.0 <= self.boft_dropout <= 1.0:
            raise ValueError(f"BOFTConfig.boft_dropout must be in [0, 1], got {self.boft_dropout}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform` as well.")

    def layout(self, in_features: int) -> tuple[int, int]:
        """(nb, b): the number and size of the blocks of a layer with `in_features` inputs."""
        if self.boft_block_num:
            return self.boft_block_num, in_features // self.boft_block_num
        return in_features // self.boft_block_size, self.boft_block_size

    def rank_for(self, module: str) -> int:
        return self.boft_block_size or self.boft_block_num

    def rank_origin(self, module: str) -> str:
        return (
            f"boft_block_size={self.boft_block_size}, boft_block_num={self.boft_block_num}, "
            f"boft_n_butterfly_factor={self.boft_n_butterfly_factor}"
        )


def check_butterfly(config: BOFTConfig, module: str, in_features: int, levels: int) -> None:
    """PEFT's `update_layer` checks for a layer with `in_features` inputs and `levels` butterfly
    factors, in PEFT's order; ValueError naming the module, the values and the fix."""
    m = levels - 1
    size, num = config.boft_block_size, config.boft_block_num
    fields = f"{config.rank_origin(module)}, {levels} level(s)"
    problem = None
    if num:
        if in_features % num:
            problem = f"in_features {in_features} is not divisible by boft_block_num {num}"
        elif m and m > int(math.log2(num)):
            problem = f"boft_block_num {num} is below 2^(boft_n_butterfly_factor - 1) = {2**m}"
        elif m and num % 2**m:
            problem = f"boft_block_num {num} is not a multiple of 2^{m}"
    elif in_features % size:
        problem = f"in_features {in_features} is not divisible by boft_block_size {size}"
    elif m and in_features % (size * 2**m):
        problem = f"in_features {in_features} is not a multiple of boft_block_size x 2^{m}"
    if problem is None and m:
        blocks, block = config.layout(in_features)
        if blocks % 2 or block % 2:
            problem = f"the {blocks} blocks of size {block} must be an even number of even size"
    if problem is not None:
        raise ValueError(
            f"{module}: {problem} ({fields}), which PEFT refuses too; choose a block size or "
            "number that fits every targeted layer, or a smaller boft_n_butterfly_factor"
        )


def block_butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> np.ndarray:
    """PEFT's `BOFTLayer.block_butterfly_perm`: the permutation [n] of one butterfly level.

    Each group of n / b features is reordered by its sub-blocks of size r, even positions first,
    then odd ones. `perm_mat[j, perm[j]] = 1` is the level's P.
    """
    if n_butterfly_factor == 0:
        return np.arange(n)
    if b * r * 2 > n:
        raise ValueError("Invalid number of blocks!")
    group = n // b
    step = group / r
    positions = np.concatenate([np.arange(0, step, 2), np.arange(1, step, 2)])
    order = np.zeros(group, dtype=np.int64)
    for i, pos in enumerate(positions):
        order[int(i * r) : int(i * r + r)] = np.arange(group)[int(pos * r) : int(pos * r + r)]
    indices = np.arange(n)
    for start in range(0, n, group):
        indices[start : start + group] = indices[start : start + group][order]
    return indices


def butterfly_perms(in_features: int, levels: int, blocks: int, size: int) -> list[np.ndarray]:
    """The permutations of PEFT's `boft_P` [levels, in, in] (not saved: rebuilt from sizes)."""
    return [
        block_butterfly_perm(in_features, int(blocks / 2**i), int(size / 2), levels - 1)
        for i in range(levels)
    ]


def apply_level(x: jax.Array, rotation: jax.Array, perm: np.ndarray) -> jax.Array:
    """x P blockdiag(rotation) P^T for `x` [..., in] and `rotation` [..., nb, b, b] (leading
    dims broadcasting against x's): a gather, a batched block matmul, a gather."""
    identity = bool((perm == np.arange(perm.size)).all())
    if not identity:
        x = x[..., np.argsort(perm)]
    nb, size = rotation.shape[-3], rotation.shape[-1]
    blocks = x.reshape(*x.shape[:-1], nb, 1, size)
    x = jnp.matmul(blocks, rotation).reshape(x.shape)
    return x if identity else x[..., perm]


def rotate(x: jax.Array, rotations: jax.Array, transpose: bool) -> jax.Array:
    """x R_tot, or x R_tot^T with `transpose`, for `x` [..., in] and `rotations` [..., levels,
    nb, b, b] (leading dims broadcasting against x's): R_tot = M_m ... M_0, so x R_tot applies
    M_m first; M_i^T is the same butterfly with transposed blocks."""
    levels, nb, size = rotations.shape[-4], rotations.shape[-3], rotations.shape[-1]
    perms = butterfly_perms(x.shape[-1], levels, nb, size)
    order = range(levels) if transpose else reversed(range(levels))
    for i in order:
        rotation = rotations[..., i, :, :, :]
        if transpose:
            rotation = jnp.swapaxes(rotation, -1, -2)
        x = apply_level(x, rotation, perms[i])
    return x


def block_dropout(rotations: jax.Array, key: jax.Array, p: float) -> jax.Array:
    """PEFT's multiplicative dropout on [levels, nb, b, b]: floor(p nb) blocks of one random
    level replaced by the identity, no rescaling."""
    levels, nb, size = rotations.shape[-4], rotations.shape[-3], rotations.shape[-1]
    level_key, block_key = jax.random.split(key)
    level = jax.random.randint(level_key, (), 0, levels)
    dropped = jax.random.permutation(block_key, jnp.arange(nb) < int(p * nb))
    mask = (jnp.arange(levels)[:, None] == level) & dropped[None, :]
    return jnp.where(mask[..., None, None], jnp.eye(size, dtype=rotations.dtype), rotations)


@dataclasses.dataclass(frozen=True)
class BOFTWeight:
    """A linear weight with BOFT; leaves may carry a leading stacked-layer axis [L].

    base [out, in]; boft_r [levels, nb, b, b]; boft_s [out, 1]; active [] bool (stacked layers
    the adapter covers: the others hold zeros, R = I, and their scale counts as 1);
    dropout_key: a PRNG key while training with boft_dropout > 0, else None.
    """

    base: Any
    boft_r: jax.Array
    boft_s: jax.Array
    active: jax.Array | None = None
    dropout_key: jax.Array | None = None
    dropout: float = 0.0

    def rotations(self) -> jax.Array:
        """The orthogonal blocks Q in float32: [..., levels, nb, b, b]."""
        r = self.boft_r.astype(jnp.float32)
        return cayley(0.5 * (r - jnp.swapaxes(r, -1, -2)), neumann=False, terms=0)

    def scale(self) -> jax.Array:
        """s in float32, ones on uncovered layers: [..., out, 1]."""
        scale = self.boft_s.astype(jnp.float32)
        if self.active is None:
            return scale
        return jnp.where(self.active[..., None, None], scale, 1.0)

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out] (one layer's slice): (x R_tot) W^T * s + bias, the
        rotation in float32 and cast back to x's dtype before the base matmul."""
        rotations = self.rotations()
        if self.dropout_key is not None:
            rotations = block_dropout(rotations, self.dropout_key, self.dropout)
        rotated = rotate(x.astype(jnp.float32), rotations, transpose=False).astype(x.dtype)
        y = dense(rotated, self.base).astype(jnp.float32) * self.scale()[..., 0]
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return y.astype(x.dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError("a BOFT linear weight was used as an embedding table")

    def merged_weight(self) -> jax.Array:
        """W R_tot^T * s: [..., out, in] in the base's dtype."""
        return fold(self, unmerge=False)

    def unmerged_weight(self) -> jax.Array:
        """W' R_tot / s: [..., out, in] in the base's dtype (PEFT inverts R by its transpose)."""
        return fold(self, unmerge=True)


jax.tree_util.register_dataclass(
    BOFTWeight,
    data_fields=["base", "boft_r", "boft_s", "active", "dropout_key"],
    meta_fields=["dropout"],
)


@functools.partial(jax.jit, static_argnames="unmerge")
def fold(node: BOFTWeight, unmerge: bool) -> jax.Array:
    """`node`'s merged weight W R_tot^T * s, or with `unmerge` W R_tot / s: [..., out, in].
    Jitted: merge runs outside any jit, where the levels' many small ops would each dispatch."""
    rows = node.rotations()[..., None, :, :, :, :]  # one R_tot for every row of W
    rotated = rotate(node.base.astype(jnp.float32), rows, transpose=not unmerge)
    scale = node.scale()
    return (rotated / scale if unmerge else rotated * scale).astype(node.base.dtype)


def saved_levels(config: BOFTConfig, pieces: Mapping[str, Any]) -> int:
    """The butterfly levels of a module: boft_R's first dim when it is 1 (PEFT without its CUDA
    extension) or the config's factor, else (a new adapter, or a wrong file) the factor."""
    factor = config.boft_n_butterfly_factor
    if BOFT_R in pieces and np.ndim(pieces[BOFT_R]) == 4:
        levels = np.shape(pieces[BOFT_R])[0]
        return levels if levels in (1, factor) else factor
    return factor


@register
class BOFT(LowRankMethod):
    """BOFT on linear layers."""

    peft_type = "BOFT"
    name = "boft"
    config_class = BOFTConfig
    # PEFT's MetaMathQA BOFT run (b=4 on Llama-3.2-3B) used the shared 1e-4 for 5000 steps, as
    # its LoRA and OFT runs did; a first Adam step moves every entry of R, so each block's skew
    # part, by ~lr (as OFT's), on the order of LoRA's first change: OFT's job lr.
    default_lr = 2e-3
    job_help = "BOFT, block size --r (boft_block_num 0), all-linear on the top layers"
    piece_names = (BOFT_R, BOFT_S)
    bias_only_value = "boft_only"

    def expected_shapes(self, config: BOFTConfig, module, base_shape, pieces):
        """boft_R [levels, nb, b, b] (`saved_levels`) and boft_s [out, 1]; sizes the config
        leaves open (in_features ANY, for a file) are any."""
        out_features, in_features = base_shape
        levels = saved_levels(config, pieces)
        if in_features is ANY:
            blocks, size = config.boft_block_num or ANY, config.boft_block_size or ANY
        else:
            blocks, size = config.layout(in_features)
        return {BOFT_R: (levels, blocks, size, size), BOFT_S: (out_features, 1)}

    def check_shapes(self, config: BOFTConfig, module, base_shape, pieces) -> None:
        """PEFT's block checks for the levels the adapter holds, then the shapes."""
        check_butterfly(config, module, base_shape[1], saved_levels(config, pieces))
        super().check_shapes(config, module, base_shape, pieces)

    def module_constants(self, config, module, pieces):
        return {}

    def init_module(self, config: BOFTConfig, ref, weight, key) -> tuple[Pieces, Pieces]:
        """R = 0 (the identity) and s = 1; with init_weights=False, R ~ N(0, 0.1) and
        s ~ N(1, 0.1), as PEFT."""
        check_butterfly(config, ref.name, ref.shape[1], config.boft_n_butterfly_factor)
        shapes = self.expected_shapes(config, ref.name, tuple(ref.shape), {})
        if config.init_weights:
            return {BOFT_R: jnp.zeros(shapes[BOFT_R]), BOFT_S: jnp.ones(shapes[BOFT_S])}, {}
        r_key, s_key = jax.random.split(key)
        return {
            BOFT_R: 0.1 * jax.random.normal(r_key, shapes[BOFT_R]),
            BOFT_S: 1.0 + 0.1 * jax.random.normal(s_key, shapes[BOFT_S]),
        }, {}

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config: BOFTConfig):
        training = dropout_key is not None and config.boft_dropout > 0
        return BOFTWeight(
            base=base,
            boft_r=pieces[BOFT_R],
            boft_s=pieces[BOFT_S],
            active=active,
            dropout_key=dropout_key if training else None,
            dropout=config.boft_dropout,
        )

    def job_fields(self, job: JobSpec) -> dict[str, Any]:
        """`--r` is BOFT's block size, so boft_block_num is 0; BOFT has no alpha."""
        return {"boft_block_num": 0}
