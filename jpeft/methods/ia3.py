"""(IA)^3: learned vectors that rescale activations, with PEFT's semantics and file format.

Math (Liu et al. 2022, https://arxiv.org/abs/2205.05638), per targeted linear `W` [out, in] with
bias `b` [out] and a learned vector `ia3_l`:

    feed-forward modules:  l [1, in]   scales the input:   y = W (x * l) + b
    all other modules:     l [out, 1]  scales the output:  y = (W x + b) * l

The scaling runs in float32 and is cast back to the activations' dtype, as in PEFT. W * l is never
formed in the forward pass, and W is a plain input, so training (which differentiates l only) forms
no weight-sized gradient. Merging folds l into W (and into b for output-scaled modules);
unmerging divides it out exactly (PEFT adds 1e-8 to l first).

Which modules are feed-forward is decided when the adapter is made (`feedforward_modules`, or
PEFT's default for the model type) and is then read from the vector's shape, which is also how a
loaded adapter tells them apart.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import targeting
from jpeft import tree as jtree
from jpeft.adapter import Adapter
from jpeft.config import PeftConfig
from jpeft.method import JobOptionError, JobSpec, WeightMethod, register
from jpeft.methods import common
from jpeft.ops import dense
from jpeft.tree import ModuleRef

L_KEY = "ia3_l"

# PEFT's per-architecture IA3 defaults (utils/constants.py), used when the config field is None.
DEFAULT_TARGETS = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"),
}
DEFAULT_FEEDFORWARD = {model_type: ("down_proj",) for model_type in DEFAULT_TARGETS}


@dataclasses.dataclass(frozen=True)
class IA3Config(PeftConfig):
    """PEFT's `IA3Config`: same field names, defaults and JSON."""

    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    feedforward_modules: str | Sequence[str] | None = None
    fan_in_fan_out: bool = False
    modules_to_save: Sequence[str] | None = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        """PEFT checks the subset rule only when both fields are lists (not a regex, not None)."""
        feedforward, targets = self.feedforward_modules, self.target_modules
        if not (isinstance(feedforward, tuple) and isinstance(targets, tuple)):
            return
        missing = sorted(set(feedforward) - set(targets))
        if missing:
            raise ValueError(
                f"IA3Config.feedforward_modules={list(feedforward)!r} must be a subset of "
                f"target_modules={list(targets)!r}, but {missing} are not targets; add them to "
                "target_modules, or remove them from feedforward_modules ([] when no target is "
                "feed-forward)"
            )


def is_feedforward(feedforward_modules: str | Sequence[str], module_name: str) -> bool:
    """PEFT's rule: a regex is `re.fullmatch`ed; a list entry matches any name ending with it."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_name) is not None
    return any(module_name.endswith(entry) for entry in feedforward_modules)


def _shown_modules(modules: str | Sequence[str]) -> str | list[str]:
    """A module-list field as the user wrote it: a regex, or a list (not the frozen tuple)."""
    return modules if isinstance(modules, str) else list(modules)


# ---------------------------------------------------------------------------------------------
# the adapted-weight node


@dataclasses.dataclass(frozen=True)
class IA3Weight:
    """A linear weight with an (IA)^3 vector: leaves may carry a leading stacked-layer axis [L].

    base [out, in]; ia3_l [1, in] (feed-forward) or [out, 1]; active [] bool (stacked layers the
    adapter covers; the others hold zeros and act as ones); feedforward: static, from the shapes.
    """

    base: jax.Array
    ia3_l: jax.Array
    active: jax.Array | None = None
    feedforward: bool = False

    def scale(self) -> jax.Array:
        """l in float32, ones on uncovered layers: [..., 1, in] or [..., out, 1]."""
        scale = self.ia3_l.astype(jnp.float32)
        if self.active is None:
            return scale
        return jnp.where(self.active[..., None, None], scale, 1.0)

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out] (one layer's slice)."""
        if self.feedforward:
            scaled = (x.astype(jnp.float32) * self.scale()[..., 0, :]).astype(x.dtype)
            return dense(scaled, self.base, bias)
        y = dense(x, self.base, bias)
        return (y.astype(jnp.float32) * self.scale()[..., 0]).astype(y.dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError("an IA3 linear weight was used as an embedding table")

    def merged_weight(self) -> jax.Array:
        """W * l: [..., out, in]."""
        return (self.base.astype(jnp.float32) * self.scale()).astype(self.base.dtype)

    def unmerged_weight(self) -> jax.Array:
        """W / l, exactly: [..., out, in]."""
        return (self.base.astype(jnp.float32) / self.scale()).astype(self.base.dtype)

    def merged_bias(self, bias: jax.Array) -> jax.Array:
        """b * l for an output-scaled module, b for a feed-forward one: [..., out]."""
        if self.feedforward:
            return bias
        return (bias.astype(jnp.float32) * self.scale()[..., 0]).astype(bias.dtype)

    def unmerged_bias(self, bias: jax.Array) -> jax.Array:
        """b / l for an output-scaled module, b for a feed-forward one: [..., out]."""
        if self.feedforward:
            return bias
        return (bias.astype(jnp.float32) / self.scale()[..., 0]).astype(bias.dtype)


jax.tree_util.register_dataclass(
    IA3Weight, data_fields=["base", "ia3_l", "active"], meta_fields=["feedforward"]
)


def _feedforward_shape(base_shape: tuple, vector_shape: tuple) -> bool:
    """True for l [..., 1, in], False for l [..., out, 1]; ValueError when a stack mixes both."""
    out_dim, in_dim = base_shape[-2:]
    if tuple(vector_shape[-2:]) == (out_dim, 1):
        return False
    if tuple(vector_shape[-2:]) == (1, in_dim):
        return True
    raise ValueError(
        f"the stacked ia3_l vectors have shape {tuple(vector_shape)} for base weights of shape "
        f"{tuple(base_shape)}: some layers of this module hold a feed-forward vector (1, {in_dim}) "
        f"and others an output vector ({out_dim}, 1). jpeft runs a module's stacked layers as one "
        "op, so the module must be feed-forward in every layer or in none"
    )


# ---------------------------------------------------------------------------------------------
# init


def _init_adapter(params, config: IA3Config, key, model=None) -> Adapter:
    """Targets and feed-forward modules resolved by PEFT's rules; vectors of ones (or N(0, 1)
    with init_ia3_weights=False), in the base weights' dtype."""
    common.warn_fan_in_fan_out(config)
    model_type = common.model_type_of(model)
    # feedforward_modules plays no part in targeting; leaving it out keeps the subset check to
    # the user's own lists, as in PEFT (its defaults are filled in without a check).
    targets = targeting.resolve_targets(
        params, config.replace(feedforward_modules=None), model_type, defaults=DEFAULT_TARGETS
    )
    feedforward_modules = _feedforward_modules(config, model_type)
    feedforward = {ref.name: is_feedforward(feedforward_modules, ref.name) for ref in targets}
    _check_stacked_groups(targets, feedforward, feedforward_modules)
    weights = {}
    for index, ref in enumerate(targets):
        if ref.kind == "embedding":
            raise ValueError(
                f"{ref.name} is an embedding table, and IA3 adapts linear layers only (PEFT "
                "rejects it too); remove it from target_modules"
            )
        out_dim, in_dim = ref.shape
        shape = (1, in_dim) if feedforward[ref.name] else (out_dim, 1)
        dtype = common.adapter_dtype(jtree.get_path(params, f"{ref.tree_path}.weight"))
        vector = _init_vector(config, shape, jax.random.fold_in(key, index))
        weights[ref.name] = {L_KEY: vector.astype(dtype)}
    saved = targeting.resolve_modules_to_save(params, config.modules_to_save or ())
    return Adapter(config, weights, common.base_leaf_copies(params, saved))


def _feedforward_modules(config: IA3Config, model_type: str | None) -> str | tuple[str, ...]:
    if config.feedforward_modules is not None:
        return config.feedforward_modules
    if model_type not in DEFAULT_FEEDFORWARD:
        raise ValueError(
            "feedforward_modules is None and there is no default for model type "
            f"{model_type!r}; pass feedforward_modules explicitly ([] when no target is "
            f"feed-forward; defaults exist for {sorted(DEFAULT_FEEDFORWARD)}; pass model= to "
            "init_adapter so jpeft knows the model type)"
        )
    return DEFAULT_FEEDFORWARD[model_type]


def _init_vector(config: IA3Config, shape: tuple[int, int], key) -> jax.Array:
    if config.init_ia3_weights:
        return jnp.ones(shape, jnp.float32)
    return jax.random.normal(key, shape, jnp.float32)


def _check_stacked_groups(
    targets: list[ModuleRef], feedforward: Mapping[str, bool], feedforward_modules
) -> None:
    """ValueError naming the layers when a stacked module is feed-forward in some layers only."""
    kinds: dict[str, dict[bool, list[int]]] = {}
    for ref in targets:
        if ref.layer is not None:
            by_kind = kinds.setdefault(ref.tree_path, {})
            by_kind.setdefault(feedforward[ref.name], []).append(ref.layer)
    shown = _shown_modules(feedforward_modules)
    for tree_path, layers in kinds.items():
        if len(layers) > 1:
            raise ValueError(
                f"feedforward_modules={shown!r} makes {tree_path} "
                f"feed-forward in layers {layers[True]} but not in layers {layers[False]}; jpeft "
                "runs a module's stacked layers as one op, so make feedforward_modules match "
                "this module in every layer or in none"
            )


def _layer_regex(names: Sequence[str], layers: list[int] | None) -> str | list[str]:
    """PEFT target_modules for `names` in `layers` only: a full-match regex (IA3 has no
    `layers_to_transform`), or the plain names for all layers."""
    if layers is None:
        return list(names)
    alternatives = "|".join(re.escape(name) for name in names)
    indices = "|".join(str(i) for i in layers)
    return rf"model\.layers\.({indices})\.\w+\.({alternatives})"


@register
class IA3(WeightMethod):
    """(IA)^3 on linear layers."""

    peft_type = "IA3"
    name = "ia3"
    config_class = IA3Config
    default_lr = 1e-2
    job_help = "IA3, PEFT's targets for the architecture on the top layers"
    piece_names = (L_KEY,)
    piece_axes = {L_KEY: (0, 1)}  # [out, 1] or [1, in]: the size-1 axis stays whole

    def init_adapter(self, params, config: IA3Config, key, model=None) -> Adapter:
        return _init_adapter(params, config, key, model)

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config) -> IA3Weight:
        vector = pieces[L_KEY]
        return IA3Weight(base, vector, active, _feedforward_shape(base.shape, np.shape(vector)))

    def check_shapes(self, config: IA3Config, module: str, base_shape: tuple, pieces) -> None:
        """ValueError naming the module and both shapes when a vector does not fit its weight."""
        out_dim, in_dim = base_shape
        got = tuple(np.shape(pieces[L_KEY]))
        if got not in ((1, in_dim), (out_dim, 1)):
            raise ValueError(
                f"{module}.{L_KEY} has shape {got}, but the model's weight {module}.weight has "
                f"shape {tuple(base_shape)}, which needs {L_KEY} of shape (1, {in_dim}) "
                f"(feed-forward) or ({out_dim}, 1); was the adapter trained on another model?"
            )

    def check_file_pieces(self, config: IA3Config, module: str, pieces, source: str) -> None:
        """A vector [1, in] (feed-forward) or [out, 1], on the side `feedforward_modules` says
        when the config lists them (PEFT builds the vector from the config alone)."""
        got = tuple(np.shape(pieces[L_KEY]))
        if len(got) != 2 or 1 not in got:
            raise ValueError(
                f"{source}: {module}.{L_KEY} has shape {got}; an IA3 vector is [1, in] "
                "(feed-forward) or [out, 1]"
            )
        if config.feedforward_modules is None or got == (1, 1):
            return
        feedforward = is_feedforward(config.feedforward_modules, module)
        if feedforward != (got[0] == 1):
            shown = _shown_modules(config.feedforward_modules)
            side = "[1, in]" if feedforward else "[out, 1]"
            raise ValueError(
                f"{source}: {module}.{L_KEY} has shape {got}, but adapter_config.json's "
                f"feedforward_modules={shown!r} make the module "
                f"{'' if feedforward else 'not '}feed-forward, with a vector {side}; was the "
                "file written with another adapter_config.json?"
            )

    def job_config(self, job: JobSpec) -> IA3Config:
        """PEFT's IA3 targets for the architecture (or `--target-modules` names) on the top
        layers; its feed-forward defaults among them."""
        names = job.target_modules or DEFAULT_TARGETS.get(job.model_type)
        if names is None or isinstance(names, str):
            raise JobOptionError(
                "--method ia3 needs --target-modules as a comma-separated list of module names "
                f"for model type {job.model_type!r}"
            )
        feedforward = [n for n in DEFAULT_FEEDFORWARD.get(job.model_type, ()) if n in names]
        return IA3Config(
            target_modules=_layer_regex(names, job.train_layers),
            feedforward_modules=feedforward,
            **job.common,
        )
