"""OFT (orthogonal finetuning, "OFTv2"), with PEFT 0.21.2's semantics and file format.

Math (Qiu et al. 2023, https://arxiv.org/abs/2306.07280, as PEFT >= 0.18 implements it), per
targeted linear `W` [out, in] split into `nb` blocks of size `b` along `in` (nb * b = in):

    Q_i = skew(vec_i)  [b, b]: vec_i [b(b-1)/2] fills the upper triangle row-major, Q = M - M^T
    R_i = I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1)     use_cayley_neumann (n terms; n <= 1: I)
    R_i = (I - Q)(I + Q)^-1                             otherwise (exact Cayley)
    y   = rotate(x) W^T + b,   rotate(x)[..., i, :] = x[..., i, :] @ R_i

The two parametrisations are NOT the same matrix: the Neumann series approximates
(I + Q)(I - Q)^-1, the transpose of the exact branch. Each is ported literally.

Merge: W' = W R_bd^T (R_bd the block-diagonal [in, in]); unmerge: W = W' (R_bd^-1)^T, as PEFT
(>= 0.18) inverts R. Options:
- `r` (number of blocks) or `oft_block_size` (b), exactly one non-zero; per layer the given one
  is moved to the nearest divisor of `in` (ties to the lower, PEFT's `adjust_oft_parameters`) and
  the other follows. The saved piece `oft_R.weight` is [nb, b(b-1)/2].
- `block_share`: one block [1, b(b-1)/2] used for every block.
- `coft` (constrained OFT): PEFT projects the parameter in place, without gradient, onto the ball
  ||Q_i||_F <= eps / sqrt(rows) on every forward and merge. jpeft's node projects it too (the
  gradient passes straight through, as PEFT's is taken at the projected value), and the
  optimizer (`wrap_optimizer`) steps from the projected value, as PEFT's in-place copy does.
- `module_dropout`: PEFT 0.21.2 builds its multiplicative dropout but never calls it, so it has
  no effect, here either (a warning says so).

Format history (jpeft refuses the first two, with the reason):
- 0.7-0.13: no `oft_block_size` in adapter_config.json (full `oft_r` blocks sized by out);
  PEFT 0.21.2 refuses the config too.
- 0.14-0.15: `oft_r` [r, b, b] plus `oft_s` [out, 1] tensors. PEFT 0.21.2 means to refuse them
  (".oft_r." in a key), but a saved key ends in ".oft_r", so it loads an identity adapter with
  a missing-keys warning: a silent no-op jpeft does not copy.
- 0.16-0.17: today's tensor, but a Neumann series whose last term had coefficient 2; PEFT loads
  it with today's series and a warning, and so does jpeft.

Linear layers only (PEFT's embedding and Conv2d OFT have no jpeft counterpart yet). A 4-bit base
works as in PEFT's quantized layers: the input is rotated and the base runs as it is.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.adapter import Adapter
from jpeft.method import JobSpec, register
from jpeft.methods.low_rank import ANY, LowRankConfig, LowRankMethod
from jpeft.ops import dense

OFT_R = "oft_R.weight"
# The first PEFT version whose Cayley-Neumann series jpeft (like PEFT 0.21.2) computes.
NEUMANN_SINCE = (0, 18)


@dataclasses.dataclass(frozen=True)
class OFTConfig(LowRankConfig):
    """PEFT's `OFTConfig`: same field names, defaults and JSON (`use_cayley_neumann` defaults to
    True, whatever PEFT's docstring says)."""

    ALPHA_FIELD: ClassVar[str | None] = None

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: str | Sequence[str] | None = None
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "oft_only"] = "none"
    exclude_modules: str | Sequence[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        """PEFT's checks: exactly one of r / oft_block_size non-zero (and neither negative)."""
        for field in ("r", "oft_block_size"):
            if getattr(self, field) < 0:
                raise ValueError(f"OFTConfig.{field} must be >= 0, got {getattr(self, field)}")
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ValueError(
                f"OFTConfig needs exactly one of r ({self.r}) and oft_block_size "
                f"({self.oft_block_size}) non-zero, as r x oft_block_size = in_features; set the "
                "other to 0"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform` as well.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> OFTConfig:
        """PEFT's `check_kwargs`: a config without `oft_block_size` (PEFT <= 0.13) is refused; a
        `use_cayley_neumann` true one from before PEFT 0.18 warns that its series changed."""
        if "oft_block_size" not in data:
            raise ValueError(
                f"{source}: an OFT adapter_config.json without 'oft_block_size' was written by "
                "PEFT <= 0.13, whose OFT (full blocks sized by out_features) PEFT 0.21.2 refuses "
                "to load as well; retrain the adapter, or use PEFT <= 0.13.0"
            )
        if data.get("use_cayley_neumann", False) and written_before_neumann_fix(data):
            warnings.warn(
                f"{source}: written by PEFT {data.get('peft_version', '< 0.18')} with "
                "use_cayley_neumann=True; PEFT 0.18 changed the series' last term (coefficient 2 "
                "to 1), and jpeft, like PEFT 0.21.2, computes the new one, so outputs differ "
                "slightly from the training run; retrain with PEFT >= 0.18 or jpeft",
                stacklevel=2,
            )
        return super().from_dict(data, source)

    def blocks_for(self, in_features: int) -> tuple[int, int]:
        """(r, block size) PEFT gives a layer with `in_features` inputs (`update_layer`)."""
        if self.r == 0:
            size = self.oft_block_size
            if in_features % size or size > in_features:
                size = nearest_divisor(in_features, size)
            return in_features // size, size
        rank = self.r
        if in_features % rank or rank > in_features:
            rank = nearest_divisor(in_features, rank)
        return rank, in_features // rank

    def rank_for(self, module: str) -> int:
        return self.r

    def rank_origin(self, module: str) -> str:
        return f"r={self.r}, oft_block_size={self.oft_block_size}, block_share={self.block_share}"


def written_before_neumann_fix(data: Mapping[str, Any]) -> bool:
    """Whether `peft_version` (missing: old) is before 0.18, PEFT's Neumann series change."""
    found = re.match(r"(\d+)\.(\d+)", str(data.get("peft_version", "0.0")))
    return found is None or (int(found[1]), int(found[2])) < NEUMANN_SINCE


def nearest_divisor(in_features: int, value: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of `in_features` nearest `value` (ties to the
    lower one), or `in_features` when `value` exceeds it."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def block_size_of(vec: jax.Array) -> int:
    """b from a piece [..., rows, b(b-1)/2]."""
    return (1 + math.isqrt(1 + 8 * vec.shape[-1])) // 2


def skew(vec: jax.Array, size: int) -> jax.Array:
    """[..., rows, b(b-1)/2] -> [..., rows, b, b]: the upper triangle filled row-major, M - M^T."""
    rows, cols = np.triu_indices(size, 1)
    upper = jnp.zeros((*vec.shape[:-1], size, size), vec.dtype).at[..., rows, cols].set(vec)
    return upper - jnp.swapaxes(upper, -1, -2)


def project(vec: jax.Array, eps: float) -> jax.Array:
    """COFT's projection [..., rows, n]: each block's Q scaled onto ||Q||_F <= eps / sqrt(rows)
    when outside (PEFT's `_project_batch`; ||Q||_F = sqrt(2) ||vec||)."""
    radius = eps / math.sqrt(vec.shape[-2])
    norm = jnp.sqrt(2.0 * jnp.sum(vec * vec, axis=-1, keepdims=True))
    return jnp.where(norm <= radius, vec, vec * (radius / jnp.maximum(norm, 1e-30)))


def cayley(q: jax.Array, neumann: bool, terms: int) -> jax.Array:
    """R [..., b, b] from skew Q [..., b, b], literally as PEFT's `_cayley_batch`."""
    eye = jnp.eye(q.shape[-1], dtype=q.dtype)
    if not neumann:  # torch.linalg.solve(I + Q, I - Q, left=False): R (I + Q) = I - Q, whose
        # transpose, with Q^T = -Q, is (I - Q) R^T = I + Q
        return jnp.swapaxes(jnp.linalg.solve(eye - q, jnp.broadcast_to(eye + q, q.shape)), -1, -2)
    rotation = jnp.broadcast_to(eye, q.shape)
    if terms > 1:
        rotation = rotation + 2 * q
    if terms > 2:
        power = q @ q
        rotation = rotation + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            rotation = rotation + 2 * power
        rotation = rotation + power @ q
    return rotation


@dataclasses.dataclass(frozen=True)
class OFTWeight:
    """A linear weight with OFT; leaves may carry a leading stacked-layer axis [L].

    base [out, in]; vec [rows, b(b-1)/2] (rows = nb, or 1 with block_share; zeros, the identity,
    on layers the adapter does not cover). Static: the parametrisation and COFT's settings.
    """

    base: Any
    vec: jax.Array
    neumann: bool = True
    terms: int = 5
    coft: bool = False
    eps: float = 6e-5

    def blocks(self) -> jax.Array:
        """The rotation blocks in float32: [..., nb, b, b] (one block broadcast with
        block_share)."""
        vec = self.vec.astype(jnp.float32)
        if self.coft:  # PEFT projects in place without gradient: a straight-through projection
            vec = vec + jax.lax.stop_gradient(project(vec, self.eps) - vec)
        size = block_size_of(vec)
        rotation = cayley(skew(vec, size), self.neumann, self.terms)
        count = self.base.shape[-1] // size
        return jnp.broadcast_to(rotation, (*rotation.shape[:-3], count, size, size))

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out] (one layer's slice): rotate(x) W^T + b, the rotation in
        float32 (PEFT's adapter dtype) and cast back to x's dtype before the base matmul."""
        rotation = self.blocks()
        nb, size = rotation.shape[-3], rotation.shape[-1]
        blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], nb, size)
        rotated = jnp.einsum("...rk,rkc->...rc", blocks, rotation).reshape(x.shape)
        return dense(rotated.astype(x.dtype), self.base, bias)

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError("an OFT linear weight was used as an embedding table")

    def _apply_blocks(self, rotation: jax.Array) -> jax.Array:
        """W [..., out, in] with each block of `in` multiplied by its block's transpose: W B^T."""
        base = self.base.astype(jnp.float32)
        nb, size = rotation.shape[-3], rotation.shape[-1]
        blocks = base.reshape(*base.shape[:-1], nb, size)
        out = jnp.einsum("...orc,...rkc->...ork", blocks, rotation)
        return out.reshape(base.shape).astype(self.base.dtype)

    def merged_weight(self) -> jax.Array:
        """W R_bd^T: [..., out, in] in the base's dtype."""
        return self._apply_blocks(self.blocks())

    def unmerged_weight(self) -> jax.Array:
        """W (R_bd^-1)^T: [..., out, in] in the base's dtype (PEFT >= 0.18 inverts R)."""
        return self._apply_blocks(jnp.linalg.inv(self.blocks()))


jax.tree_util.register_dataclass(
    OFTWeight, data_fields=["base", "vec"], meta_fields=["neumann", "terms", "coft", "eps"]
)


def coft_steps(config: OFTConfig, optimizer: optax.GradientTransformation):
    """`optimizer` stepping from the projected `oft_R` (PEFT's forward copies the projection into
    the parameter before the optimizer sees it): update = inner(P(p)) + P(p) - p."""

    def projected(params: Adapter) -> Adapter:
        weights = {
            module: {k: project(v, config.eps) if k == OFT_R else v for k, v in pieces.items()}
            for module, pieces in params.weights.items()
        }
        return Adapter(params.config, weights, params.overrides, params.frozen)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("OFT with coft=True needs the params in optimizer.update")
        target = projected(params)
        inner, state = optimizer.update(updates, state, target)
        shift = jax.tree.map(lambda new, old: new - old, target, params)
        return jax.tree.map(jnp.add, inner, shift), state

    return optax.GradientTransformation(optimizer.init, update)


@register
class OFT(LowRankMethod):
    """OFT on linear layers."""

    peft_type = "OFT"
    name = "oft"
    config_class = OFTConfig
    # PEFT's MetaMathQA OFT run (r=32, b=96 on Llama-3.2-3B) used the shared 1e-4 for 5000 steps,
    # where LoRA's used the same; jpeft's short LoRA job uses 2e-3, and OFT's first Adam step
    # rotates each block by ~lr sqrt(b) (zero-initialised skew entries all move by lr), on the
    # order of LoRA's first change, so it gets LoRA's job lr.
    default_lr = 2e-3
    job_help = "OFT, r=--r blocks per layer (oft_block_size 0), all-linear on the top layers"
    piece_names = (OFT_R,)
    bias_only_value = "oft_only"

    def expected_shapes(self, config: OFTConfig, module, base_shape, pieces):
        """oft_R.weight [nb or 1, b(b-1)/2] for the layer's in_features (any, for a file)."""
        in_features = base_shape[1]
        if in_features is ANY:
            return {OFT_R: (1 if config.block_share else ANY, ANY)}
        rank, size = config.blocks_for(in_features)
        return {OFT_R: (1 if config.block_share else rank, size * (size - 1) // 2)}

    def module_constants(self, config, module, pieces):
        return {}

    def init_module(self, config: OFTConfig, ref, weight, key):
        """Zeros (R = I) or, with init_weights=False, N(0, 0.1); warns as PEFT when r or
        oft_block_size is moved to a divisor of in_features."""
        in_features = ref.shape[1]
        rank, size = config.blocks_for(in_features)
        field, given, used = (
            ("r", config.r, rank) if config.r else ("oft_block_size", config.oft_block_size, size)
        )
        if given != used:
            warnings.warn(
                f"{ref.name}: {field}={given} does not divide in_features={in_features}; "
                f"adjusted to {used} for this layer (as PEFT)",
                stacklevel=5,
            )
        (shape,) = self.expected_shapes(config, ref.name, tuple(ref.shape), {}).values()
        if config.init_weights:
            return {OFT_R: jnp.zeros(shape, jnp.float32)}, {}
        return {OFT_R: 0.1 * jax.random.normal(key, shape, jnp.float32)}, {}

    def init_adapter(self, params, config: OFTConfig, key, model=None) -> Adapter:
        if config.module_dropout:
            warnings.warn(
                f"OFTConfig.module_dropout={config.module_dropout} has no effect: PEFT 0.21.2 "
                "builds OFT's multiplicative dropout but never applies it, and jpeft matches it",
                stacklevel=2,
            )
        return super().init_adapter(params, config, key, model)

    def from_file(self, config, tensors, params, source: str) -> Adapter:
        """Refuses PEFT 0.14-0.15 files (`oft_r`/`oft_s` tensors), which PEFT 0.21.2 means to
        refuse (see the module docstring)."""
        old = next((k for k in tensors if re.search(r"\.oft_[rs](\.|$)", k)), None)
        if old is not None:
            raise ValueError(
                f"{source}: tensor {old!r} is from PEFT 0.14-0.15's OFT (full oft_r blocks and "
                "an oft_s scale), which PEFT 0.21.2 cannot use either (it loads them as an "
                "identity adapter); retrain the adapter, or use PEFT <= 0.15.2"
            )
        return super().from_file(config, tensors, params, source)

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config: OFTConfig):
        return OFTWeight(
            base=base,
            vec=pieces[OFT_R],
            neumann=config.use_cayley_neumann,
            terms=config.num_cayley_neumann_terms,
            coft=config.coft,
            eps=config.eps,
        )

    def wrap_optimizer(self, config: OFTConfig, optimizer):
        return coft_steps(config, optimizer) if config.coft else optimizer

    def job_fields(self, job: JobSpec) -> dict[str, Any]:
        """`--r` is OFT's r (blocks per layer), so oft_block_size is 0; OFT has no alpha."""
        return {"oft_block_size": 0}
