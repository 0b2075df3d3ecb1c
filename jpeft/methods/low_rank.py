"""The shared base of the low-rank family (LoRA, LoHa, LoKr, AdaLoRA, ...), as PEFT shares
`tuners/lycoris_utils.py` and `LoraConfig`'s fields.

A low-rank method declares, per module it adapts, its pieces' init and expected shapes; the base
does the rest the same way for every member of the family:
- targets by PEFT's rules (`target_modules`, `exclude_modules`, `layers_to_transform` +
  `layers_pattern`, per-architecture defaults), refusing module kinds the method cannot adapt;
- the per-module rank and alpha from `rank_pattern` / `alpha_pattern` (first regex key matching
  `(.*\\.)?(key)$` wins);
- the per-module init loop (one PRNG key per module), pieces in float32 for a 4-bit base (PEFT
  keeps adapters on bitsandbytes layers in float32 too) and in the base's dtype otherwise;
- `modules_to_save` copies and trainable biases (`bias="all"` / `"<prefix>_only"`);
- shape checks that name the module, both shapes and the piece;
- `jpeft finetune`'s config: `--r`, `--lora-alpha`, `--target-modules` (all-linear by default) on
  the top `--train-layers` layers.
"""

from __future__ import annotations

import math
import re
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import targeting
from jpeft import tree as jtree
from jpeft.adapter import Adapter
from jpeft.config import PeftConfig
from jpeft.method import (
    JobOptionError,
    JobSpec,
    Pieces,
    WeightMethod,
    shape_fits,
    shown_shape,
)
from jpeft.methods import common
from jpeft.tree import ModuleRef

# The seven projections of a Llama-style layer: what "all-linear" means for a job that trains
# only the top layers (`layers_to_transform` needs a list of names, as in PEFT).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# `None` in an expected shape: the rank, or any size.
ANY = None


class LowRankConfig(PeftConfig):
    """Behaviour the low-rank family's configs share; each subclass declares PEFT's own fields
    (`r`, the alpha field named `ALPHA_FIELD`, `rank_pattern`, `alpha_pattern`, targeting)."""

    # The alpha field's name; None for a method without one (HRA).
    ALPHA_FIELD: ClassVar[str | None] = "alpha"
    # The field `jpeft finetune --r` sets ("r"; BOFT's is its block size).
    RANK_FIELD: ClassVar[str] = "r"
    # A dropout-like field that must lie in [0, 1): the names the subclass has.
    DROPOUT_FIELDS: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        name = type(self).__name__
        if self.r <= 0:
            raise ValueError(f"{name}.r must be a positive integer, got r={self.r!r}")
        for key, rank in (self.rank_pattern or {}).items():
            if rank <= 0:
                raise ValueError(f"{name}.rank_pattern[{key!r}] must be > 0, got {rank!r}")
        for field in ("rank_pattern", "alpha_pattern"):
            check_pattern_keys(name, field, getattr(self, field))
        for field in self.DROPOUT_FIELDS:
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}.{field} must be in [0, 1), got {value!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform` as well.")

    def rank_for(self, module: str) -> int:
        """`r`, or the first `rank_pattern` entry matching `module`."""
        return targeting.pattern_value(self.rank_pattern or {}, module, self.r)

    def rank_origin(self, module: str) -> str:
        """Where `module`'s rank comes from, for messages: "r=8" or "rank_pattern['q_proj']=4"."""
        patterns = self.rank_pattern or {}
        key = targeting.pattern_value({k: k for k in patterns}, module, None)
        return f"r={self.r}" if key is None else f"rank_pattern[{key!r}]={patterns[key]}"

    def alpha_for(self, module: str) -> float:
        """The alpha field, or the first `alpha_pattern` entry matching `module`."""
        return targeting.pattern_value(
            self.alpha_pattern or {}, module, getattr(self, self.ALPHA_FIELD)
        )


def check_regex_targets(config: LowRankConfig) -> None:
    """PEFT's rule for LoRA-like configs: a regex `target_modules` (a str) takes neither
    `layers_to_transform` nor `layers_pattern` (PEFT's messages)."""
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
    if isinstance(config.target_modules, str) and config.layers_pattern is not None:
        raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")


def check_bias(config: LowRankConfig, only: str) -> None:
    """`bias` is "none", "all" or the method's own `only` value ("lora_only", "hra_only", ...)."""
    if config.bias not in ("none", "all", only):
        raise ValueError(
            f"{type(config).__name__}.bias must be 'none', 'all' or {only!r}, got {config.bias!r}"
        )


def check_pattern_keys(config_name: str, field: str, patterns: Mapping[str, Any] | None) -> None:
    """ValueError naming the key when a `rank_pattern` / `alpha_pattern` key is not a regex (PEFT
    matches them as `(.*\\.)?(key)$`)."""
    for key in patterns or {}:
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(
                f"{config_name}.{field}[{key!r}] is not a valid regular expression ({err}); "
                "keys are module names or regexes matched against the end of module names"
            ) from None


class LowRankMethod(WeightMethod):
    """The init loop, targeting, overrides, shape checks and job config of the family.

    A member defines `init_module` (its pieces for one module), `expected_shapes` (for the shape
    check), `make_node`, and usually `module_constants` (its scaling); the default scaling is
    alpha / r per module.
    """

    # Per-architecture targets when `target_modules` is None (PEFT's utils/constants.py).
    default_targets: ClassVar[Mapping[str, tuple[str, ...]]] = targeting.DEFAULT_TARGETS
    # The module kinds (`ModuleRef.kind`: "linear", "embedding") the method can adapt.
    module_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    # The config field whose "<prefix>_only" value trains the biases of targeted modules.
    bias_only_value: ClassVar[str] = "lora_only"

    @abstractmethod
    def init_module(
        self, config: LowRankConfig, ref: ModuleRef, weight: Any, key: jax.Array
    ) -> tuple[Pieces, Pieces]:
        """(trainable pieces, frozen state) in float32 for module `ref`, whose weight is
        `weight` ([out, in] for a linear layer, [vocab, dim] for an embedding; maybe 4-bit)."""

    def expected_shapes(
        self, config: LowRankConfig, module: str, base_shape: tuple[int, ...], pieces: Pieces
    ) -> dict[str, tuple[int | None, ...]]:
        """{piece: the shape it must have for a base weight of `base_shape`}, `ANY` where the
        rank (or any size) goes."""
        return {}

    def module_constants(self, config: LowRankConfig, module: str, pieces: Pieces):
        return {"scaling": config.alpha_for(module) / config.rank_for(module)}

    # -----------------------------------------------------------------------------------------

    def init_adapter(self, params, config: LowRankConfig, key, model=None) -> Adapter:
        """Targets by PEFT's rules; pieces from `init_module`, one key per module. With
        `target_modules` None the architecture's defaults are written into the config, as PEFT
        saves the resolved names in adapter_config.json."""
        if getattr(config, "fan_in_fan_out", False):
            common.warn_fan_in_fan_out(config)
        defaults = self.default_targets.get(common.model_type_of(model))
        if config.target_modules is None and defaults is not None:
            config = config.replace(target_modules=tuple(defaults))
        targets = targeting.resolve_targets(
            params, config, common.model_type_of(model), defaults=self.default_targets
        )
        self.check_kinds(config, targets)
        weights, frozen = {}, {}
        for index, ref in enumerate(targets):
            weight = jtree.layer_of(jtree.get_path(params, f"{ref.tree_path}.weight"), ref.layer)
            pieces, start = self.init_module(config, ref, weight, jax.random.fold_in(key, index))
            dtype = common.adapter_dtype(weight)
            weights[ref.name] = {k: v.astype(dtype) for k, v in pieces.items()}
            if start:
                frozen[ref.name] = {k: v.astype(dtype) for k, v in start.items()}
        overrides = self.trainable_base_leaves(params, config, [ref.name for ref in targets])
        return Adapter(config, weights, overrides, frozen)

    def check_kinds(self, config: LowRankConfig, targets: list[ModuleRef]) -> None:
        """ValueError naming the first target whose kind the method cannot adapt."""
        for ref in targets:
            if ref.kind not in self.module_kinds:
                raise ValueError(
                    f"{ref.name} is an {ref.kind} layer, which {type(config).__name__} cannot "
                    f"adapt (it adapts {' and '.join(self.module_kinds)} layers, as in PEFT); "
                    "remove it from target_modules"
                )

    def trainable_base_leaves(self, params, config, target_names: list[str]) -> dict:
        """Copies of the base leaves the adapter trains besides its pieces: `modules_to_save`
        and, with a `bias` field, the biases it selects."""
        names = list(targeting.resolve_modules_to_save(params, config.modules_to_save or ()))
        bias = getattr(config, "bias", "none")
        if bias == "all":
            names += [n for n in jtree.hf_leaf_names(params) if n.endswith(".bias")]
        elif bias == self.bias_only_value:
            leaves = set(jtree.hf_leaf_names(params))
            names += [f"{t}.bias" for t in target_names if f"{t}.bias" in leaves]
        return common.base_leaf_copies(params, names)

    def check_shapes(self, config, module: str, base_shape: tuple[int, ...], pieces) -> None:
        """Every piece against `expected_shapes`; ValueError naming the module, the piece, both
        shapes and the shape it needs."""
        for piece, want in self.expected_shapes(config, module, base_shape, pieces).items():
            if piece not in pieces:
                continue
            got = tuple(np.shape(pieces[piece]))
            if not shape_fits(got, want):
                raise ValueError(
                    f"{module}.{piece} has shape {got}, but the model's weight {module}.weight "
                    f"has shape {tuple(base_shape)}, which needs {piece} of shape "
                    f"{shown_shape(want, 'r')} with {config.rank_origin(module)}; was the adapter "
                    "trained on another model or saved with another config?"
                )

    def file_shapes(
        self, config: LowRankConfig, module: str, pieces: Pieces
    ) -> dict[str, tuple[int | None, ...]]:
        """{piece: shape} a file holds for `module` by `config`: `expected_shapes` for a base
        weight of sizes not known yet (`ANY`), so the ranks are what is checked."""
        return self.expected_shapes(config, module, (ANY, ANY), pieces)

    def check_file_pieces(self, config, module: str, pieces, source: str) -> None:
        """The piece names and shapes `file_shapes` gives; ValueError naming the file, the module,
        the pieces missing or unknown, or the piece, its shape and the config's rank."""
        try:
            want = self.file_shapes(config, module, pieces)
        except ValueError as err:  # pieces too broken to tell the shapes (LoKr's factors)
            raise ValueError(f"{source}: {err}") from None
        missing, unknown = sorted(set(want) - set(pieces)), sorted(set(pieces) - set(want))
        if missing or unknown:
            raise ValueError(
                f"{source}: {module} holds the pieces {sorted(pieces)}, but "
                f"{type(config).__name__} ({config.rank_origin(module)}) gives it {sorted(want)}: "
                f"missing {missing}, unknown {unknown}; is the file complete, and was it written "
                "with this adapter_config.json?"
            )
        for piece, shape in want.items():
            got = tuple(np.shape(pieces[piece]))
            if not shape_fits(got, shape):
                raise ValueError(
                    f"{source}: {module}.{piece} has shape {got}, but adapter_config.json's "
                    f"{config.rank_origin(module)} needs {piece} of shape "
                    f"{shown_shape(shape)}; was the file written with another adapter_config.json?"
                )

    def job_config(self, job: JobSpec) -> PeftConfig:
        """r (`RANK_FIELD`) and alpha from `--r`/`--lora-alpha`; all-linear (or
        `--target-modules`) on the job's top layers; plus `job_fields`."""
        targets = job.target_modules or "all-linear"
        if job.train_layers and targets == "all-linear":
            targets = list(LINEAR_NAMES)
        if isinstance(targets, str) and targets != "all-linear" and job.train_layers:
            raise JobOptionError(
                f"--method {self.name} with a regex --target-modules trains the layers the regex "
                "names; add --train-layers 0 (PEFT's layers_to_transform needs a list of names)"
            )
        fields = dict(
            {self.config_class.RANK_FIELD: job.r},
            target_modules=targets,
            layers_to_transform=job.train_layers,
            **alpha_field(self.config_class, job.lora_alpha),
            **job.common,
        )
        fields.update(self.job_fields(job))
        return self.config_class(**fields)

    def job_fields(self, job: JobSpec) -> dict[str, Any]:
        """Config fields this method sets for `jpeft finetune` beyond the shared ones."""
        return {}


def alpha_field(config_class: type[LowRankConfig], alpha: float) -> dict[str, float]:
    """`{ALPHA_FIELD: alpha}` for the job's config, {} for a method without an alpha (HRA)."""
    return {config_class.ALPHA_FIELD: alpha} if config_class.ALPHA_FIELD else {}


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """torch's `kaiming_uniform_(a=sqrt(5))`, as nn.Linear and PEFT use it: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
