"""VeRA (vector-based random matrix adaptation), with PEFT's semantics and file format.

Math (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454, as PEFT implements it): two frozen
random projections shared by every targeted linear, `vera_A` [r, max_in] and `vera_B`
[max_out, r] (max over the targeted weights), and per module two trainable vectors,
`vera_lambda_b` [out] and `vera_lambda_d` [r]. For a weight `W` [out, in], with the slices
A_s = vera_A[:, :in] and B_s = vera_B[:out, :]:

    y  = x W^T + b + lambda_b * ((lambda_d * (dropout(x) A_s^T)) B_s^T)
    dW = (lambda_b[:, None] B_s) (lambda_d[:, None] A_s)           (merge: W + dW)

The forward never forms dW (two rank-r matmuls, in float32 as PEFT's adapter branch); merge and
unmerge do. Init, as PEFT: lambda_b zeros and lambda_d filled with `d_initial` (identity start),
or with `init_weights=False` ones and N(0, 1).

The projections are drawn as PEFT draws them: `torch.Generator().manual_seed(projection_prng_key)`,
kaiming-uniform with gain sqrt(2), i.e. U(+-sqrt(6 / fan_in)) with fan_in the second dim, vera_A
first, then vera_B. `torch_random.kaiming_uniform` reproduces torch's CPU stream bit for bit
(mt19937, 24 random bits per float32, the scaling fused into one rounding as torch's FMA-built CPU
kernels do), so a file saved with `save_projection=False` is read by regenerating them, as PEFT
does (with its warning: a torch build without FMA rounds differently). jpeft keeps them once, under
`adapter.frozen[SHARED]`, and saves them as PEFT does: `base_model.vera_A` / `base_model.vera_B`
(no `.model.`), only with `save_projection=True`.

PEFT's rules: one r for every module (no rank_pattern), bias "none", "all" or "vera_only"; the
projections must be saved (and present) with `save_projection=True`. PEFT adapts nn.Linear and
quantized linear layers: embedding tables are refused; a 4-bit base works (only the base matmul
reads the packed weight). In a stacked model each module's node gets the projections broadcast
over the layer axis, which the layer scan slices.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as jtree
from jpeft.adapter import SHARED, Adapter
from jpeft.config import FrozenMap
from jpeft.method import JobSpec, Pieces, register
from jpeft.methods import torch_random
from jpeft.methods.lora_ops import dropout
from jpeft.methods.low_rank import LowRankConfig, LowRankMethod, check_bias
from jpeft.ops import dense

VERA_A, VERA_B = "vera_A", "vera_B"
LAMBDA_B, LAMBDA_D = "vera_lambda_b", "vera_lambda_d"
# The safetensors keys of the shared projections (PEFT's tuner-level buffers).
PROJECTION_KEYS = {VERA_A: f"{SHARED}.{VERA_A}", VERA_B: f"{SHARED}.{VERA_B}"}
# `jpeft finetune`'s VeRA rank per `--r`: PEFT's default r=256 at the job's default --r 16.
JOB_RANK_PER_R = 16


@dataclasses.dataclass(frozen=True)
class VeraConfig(LowRankConfig):
    """PEFT's `VeraConfig`: same field names, defaults and JSON. VeRA has one rank (the shared
    projections') for every module and no alpha: the family's pattern lookups see empty
    patterns."""

    ALPHA_FIELD: ClassVar[str | None] = None
    DROPOUT_FIELDS: ClassVar[tuple[str, ...]] = ("vera_dropout",)
    rank_pattern: ClassVar[Mapping[str, int]] = FrozenMap()
    alpha_pattern: ClassVar[Mapping[str, float]] = FrozenMap()

    r: int = 256
    target_modules: str | Sequence[str] | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None

    def validate(self) -> None:
        super().validate()
        check_bias(self, "vera_only")
        if not -(2**63) <= self.projection_prng_key < 2**64:
            raise ValueError(
                "VeraConfig.projection_prng_key must fit torch.Generator.manual_seed (a 64-bit "
                f"integer, -2**63 <= key < 2**64), got {self.projection_prng_key!r}"
            )


# ---------------------------------------------------------------------------------------------
# the projections, as torch draws them (`jpeft.methods.torch_random`)


def projections(config: VeraConfig, max_out: int, max_in: int) -> dict[str, np.ndarray]:
    """PEFT's shared projections: vera_A [r, max_in], then vera_B [max_out, r]."""
    vera_a, vera_b = torch_random.kaiming_uniform(
        config.projection_prng_key, [(config.r, max_in), (max_out, config.r)]
    )
    return {VERA_A: vera_a, VERA_B: vera_b}


def largest_shape(params: Mapping[str, Any], modules: Sequence[str], source: str) -> tuple:
    """(max out, max in) over the weights of `modules` (PEFT's `_find_dim`)."""
    shapes = []
    for module in modules:
        tree_path, _ = jtree.hf_param_path(params, module)
        try:
            weight = jtree.get_path(params, f"{tree_path}.weight")
        except KeyError:
            raise ValueError(
                f"{source}: VeRA module {module!r} has no weight in the params; was the adapter "
                "made for another model?"
            ) from None
        shapes.append(jtree.leaf_shape(weight)[-2:])
    return tuple(max(dims) for dims in zip(*shapes, strict=True))


# ---------------------------------------------------------------------------------------------
# the adapted-weight node


@dataclasses.dataclass(frozen=True)
class VeraWeight:
    """A linear weight with VeRA; leaves may carry a leading stacked-layer axis [L].

    base [out, in]; vera_A [r, in] and vera_B [out, r]: the shared projections' slices;
    lambda_b [out] (zeros on layers the adapter does not cover); lambda_d [r]; dropout_key: a
    PRNG key while training with `vera_dropout`, else None.
    """

    base: jax.Array
    vera_A: jax.Array
    vera_B: jax.Array
    lambda_b: jax.Array
    lambda_d: jax.Array
    dropout_key: jax.Array | None = None
    dropout_rate: float = 0.0

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out] (one layer's slice): the base op plus, in float32,
        lambda_b * ((lambda_d * (dropout(x) A^T)) B^T), summed in float32 and cast back."""
        f32 = jnp.float32
        y = dense(x, self.base, bias)
        h = dense(dropout(x.astype(f32), self.dropout_rate, self.dropout_key), self.vera_A)
        change = dense(h * self.lambda_d.astype(f32), self.vera_B) * self.lambda_b.astype(f32)
        return (y.astype(f32) + change).astype(y.dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError("a VeRA linear weight was used as an embedding table")

    def delta(self) -> jax.Array:
        """dW = (lambda_b B)(lambda_d A) in float32: [..., out, in]."""
        f32 = jnp.float32
        scaled_b = self.lambda_b.astype(f32)[..., :, None] * self.vera_B.astype(f32)
        scaled_a = self.lambda_d.astype(f32)[..., :, None] * self.vera_A.astype(f32)
        return jnp.einsum("...or,...ri->...oi", scaled_b, scaled_a)

    def merged_weight(self) -> jax.Array:
        """W + dW: [..., out, in] in the base's dtype."""
        return (self.base.astype(jnp.float32) + self.delta()).astype(self.base.dtype)

    def unmerged_weight(self) -> jax.Array:
        """W - dW: [..., out, in] in the base's dtype."""
        return (self.base.astype(jnp.float32) - self.delta()).astype(self.base.dtype)


jax.tree_util.register_dataclass(
    VeraWeight,
    data_fields=["base", "vera_A", "vera_B", "lambda_b", "lambda_d", "dropout_key"],
    meta_fields=["dropout_rate"],
)


# ---------------------------------------------------------------------------------------------
# the method


@register
class Vera(LowRankMethod):
    """VeRA on linear layers."""

    peft_type = "VERA"
    name = "vera"
    config_class = VeraConfig
    # PEFT's MetaMathQA VeRA run (r=256) uses lr 1e-3, 10x its LoRA's 1e-4: VeRA trains vectors
    # that scale fixed random projections, and a first Adam step (size lr) moves dW by
    # ~ lr * d_initial * 2 / sqrt(in) per entry (lambda_b from 0; sum over r of B A entries of
    # size sqrt(2 / r) and sqrt(2 / in)), ~20x less than LoRA's at the job's r=16, alpha=32.
    # jpeft's LoRA job uses 2e-3; 1e-2 (5x, half PEFT's ratio) because lambda_d, which Adam
    # moves by ~lr per step, starts at only 0.1 and grows dW as it moves (not measured on the
    # main job yet).
    default_lr = 1e-2
    job_help = (
        f"VeRA, r={JOB_RANK_PER_R}x--r (PEFT's 256 at --r 16), vera_dropout=--lora-dropout, "
        "all-linear on top"
    )
    piece_names = (LAMBDA_B, LAMBDA_D)
    # lambda_b [out] follows the base's out axis; lambda_d [r] and the projections replicate
    piece_axes = {LAMBDA_B: (0,), LAMBDA_D: (None,)}
    bias_only_value = "vera_only"

    def init_adapter(self, params, config: VeraConfig, key, model=None) -> Adapter:
        """The family's init loop, plus the shared projections for the targeted weights' largest
        shape, in the pieces' dtype."""
        adapter = super().init_adapter(params, config, key, model)
        max_out, max_in = largest_shape(params, list(adapter.weights), "init_adapter")
        dtype = next(iter(adapter.weights.values()))[LAMBDA_B].dtype
        shared = {k: jnp.asarray(v, dtype) for k, v in projections(config, max_out, max_in).items()}
        return adapter.replace(frozen={**adapter.frozen, SHARED: shared})

    def init_module(self, config: VeraConfig, ref, weight, key) -> tuple[Pieces, Pieces]:
        """PEFT's init: lambda_b zeros and lambda_d `d_initial` (the identity), or with
        `init_weights=False` ones and N(0, 1)."""
        out_dim = ref.shape[0]
        if config.init_weights:
            lambda_b = jnp.zeros((out_dim,), jnp.float32)
            lambda_d = jnp.full((config.r,), config.d_initial, jnp.float32)
        else:
            lambda_b = jnp.ones((out_dim,), jnp.float32)
            lambda_d = jax.random.normal(key, (config.r,), jnp.float32)
        return {LAMBDA_B: lambda_b, LAMBDA_D: lambda_d}, {}

    def expected_shapes(self, config: VeraConfig, module: str, base_shape, pieces):
        return {LAMBDA_B: (base_shape[0],), LAMBDA_D: (config.r,)}

    def module_constants(self, config: VeraConfig, module: str, pieces: Pieces) -> dict:
        return {}

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        """The node with the projections sliced to this weight ([out, in] of `base`), broadcast
        over the layer axis of a stacked weight."""
        out_dim, in_dim = jtree.leaf_shape(base)[-2:]
        vera_a, vera_b = shared_projections(frozen, config, out_dim, in_dim)
        vera_a, vera_b = vera_a[:, :in_dim], vera_b[:out_dim, :]
        if active is not None and jnp.ndim(active) == 1:  # stacked (not one layer of a scan)
            layers = active.shape[0]
            vera_a = jnp.broadcast_to(vera_a, (layers, *vera_a.shape))
            vera_b = jnp.broadcast_to(vera_b, (layers, *vera_b.shape))
        training = dropout_key is not None and config.vera_dropout > 0
        return VeraWeight(
            base=base,
            vera_A=vera_a,
            vera_B=vera_b,
            lambda_b=pieces[LAMBDA_B],
            lambda_d=pieces[LAMBDA_D],
            dropout_key=dropout_key if training else None,
            dropout_rate=config.vera_dropout if training else 0.0,
        )

    # -----------------------------------------------------------------------------------------
    # files

    def to_file(self, adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The family's keys, plus `base_model.vera_A` / `vera_B` with `save_projection`."""
        config, tensors = super().to_file(adapter)
        if adapter.config.save_projection:
            shared = adapter.frozen.get(SHARED, {})
            tensors.update({key: shared[piece] for piece, key in PROJECTION_KEYS.items()})
        return config, tensors

    def from_file(self, config: VeraConfig, tensors, params, source: str) -> Adapter:
        """The per-module vectors as the family reads them; the projections from the file
        (`save_projection=True`, where PEFT needs them) or regenerated from
        `projection_prng_key` (`save_projection=False`, as PEFT, with its warning; this needs
        `params` for the targeted weights' largest shape)."""
        saved = {piece: tensors[key] for piece, key in PROJECTION_KEYS.items() if key in tensors}
        rest = {k: v for k, v in tensors.items() if k not in PROJECTION_KEYS.values()}
        adapter = super().from_file(config, rest, params, source)
        if config.save_projection:
            shared = saved_projections(config, saved, source)
        else:
            shared = regenerated_projections(config, saved, params, list(adapter.weights), source)
        if params is not None:
            check_projection_shapes(config, shared, params, list(adapter.weights), source)
        shared = {k: jnp.asarray(v) for k, v in shared.items()}
        return adapter.replace(frozen={**adapter.frozen, SHARED: shared})

    def job_fields(self, job: JobSpec) -> dict[str, Any]:
        """r = JOB_RANK_PER_R x `--r` (VeRA's rank is the shared projections', PEFT's default
        256 at the job's --r 16); `--lora-dropout` is `vera_dropout` (`--lora-alpha` is
        unused)."""
        return {"r": JOB_RANK_PER_R * job.r, "vera_dropout": job.lora_dropout}


def shared_projections(frozen: Mapping[str, Any], config: VeraConfig, out_dim: int, in_dim: int):
    """(vera_A, vera_B) from a node's frozen state; ValueError when they are missing or smaller
    than a weight of shape [out_dim, in_dim] needs."""
    if VERA_A not in frozen or VERA_B not in frozen:
        raise ValueError(
            f"a VeRA adapter keeps its shared projections under adapter.frozen[{SHARED!r}] "
            f"({VERA_A}, {VERA_B}); this one has none: make it with jpeft.init_adapter or "
            "jpeft.load_pretrained"
        )
    vera_a, vera_b = frozen[VERA_A], frozen[VERA_B]
    if vera_a.shape[-1] < in_dim or vera_b.shape[0] < out_dim:
        raise ValueError(
            f"VeRA's shared projections {VERA_A} {tuple(vera_a.shape)} and {VERA_B} "
            f"{tuple(vera_b.shape)} are too small for a weight of shape ({out_dim}, {in_dim}) "
            f"(they need at least {in_dim} columns and {out_dim} rows); was the adapter made "
            "for another model?"
        )
    return vera_a, vera_b


def saved_projections(config: VeraConfig, saved: Mapping[str, np.ndarray], source: str) -> dict:
    """The file's projections, both present (PEFT's load fails without them) with rank `r`."""
    if set(saved) != set(PROJECTION_KEYS):
        missing = [key for piece, key in PROJECTION_KEYS.items() if piece not in saved]
        raise ValueError(
            f"{source}: adapter_config.json says save_projection=true, but the file lacks "
            f"{missing} (PEFT refuses it too); was it written with save_projection=false? "
            "Then set that in adapter_config.json"
        )
    ranks = {VERA_A: np.shape(saved[VERA_A])[0], VERA_B: np.shape(saved[VERA_B])[-1]}
    for piece, rank in ranks.items():
        if np.ndim(saved[piece]) != 2 or rank != config.r:
            raise ValueError(
                f"{source}: {PROJECTION_KEYS[piece]} has shape {np.shape(saved[piece])}, but "
                f"adapter_config.json's r={config.r} needs rank {config.r} ({VERA_A} [r, max_in], "
                f"{VERA_B} [max_out, r]); was the file written with another adapter_config.json?"
            )
    return dict(saved)


def regenerated_projections(config: VeraConfig, saved, params, modules, source: str) -> dict:
    """PEFT's load of a `save_projection=False` file: the projections drawn again from the key
    (a file's own projections are ignored, as PEFT's load skips them), with PEFT's warnings."""
    if saved:
        warnings.warn(
            f"{source}: save_projection=false, but the file holds vera_A and vera_B; they are "
            "ignored and drawn again from projection_prng_key, as PEFT does",
            stacklevel=4,
        )
    if params is None:
        raise ValueError(
            f"{source}: a VeRA file saved with save_projection=false has no projections; jpeft "
            "draws them again from projection_prng_key for the model's weights: pass the base "
            "params, jpeft.load_pretrained(directory, params=params)"
        )
    warnings.warn(
        f"{source}: save_projection=false: vera_A and vera_B are drawn again from "
        f"projection_prng_key={config.projection_prng_key} as torch's CPU generator draws them "
        "(PEFT's warning: this may not be accurate on all system configurations)",
        stacklevel=4,
    )
    return projections(config, *largest_shape(params, modules, source))


def check_projection_shapes(config: VeraConfig, shared, params, modules, source: str) -> None:
    """ValueError naming the file when the projections are not exactly [r, max_in] and
    [max_out, r] for the model's targeted weights (PEFT's load refuses other shapes)."""
    max_out, max_in = largest_shape(params, modules, source)
    want = {VERA_A: (config.r, max_in), VERA_B: (max_out, config.r)}
    for piece, shape in want.items():
        got = tuple(np.shape(shared[piece]))
        if got != shape:
            raise ValueError(
                f"{source}: {PROJECTION_KEYS[piece]} has shape {got}, but the model's targeted "
                f"weights (largest [out, in] = [{max_out}, {max_in}]) with r={config.r} need "
                f"{shape}; was the adapter trained on another model?"
            )
