"""LN tuning: trainable copies of chosen modules (the norms by default), PEFT's `LN_TUNING`.

Zhao et al. 2023 (https://arxiv.org/abs/2312.11420) tune only the normalization layers. PEFT
deep-copies each targeted module into `ln_tuning_layers`, runs the copy instead of the module, and
merges by swapping the copy in; the file holds `<module>.ln_tuning_layers.weight` (and `.bias`
where the module has one) in the base dtype.

In jpeft a copy is what `Adapter.overrides` already are: a trainable replacement of a base leaf
(`overrides["model.layers.3.input_layernorm.weight"]`, [D]). So the forward pass, the gradients
(to the copies only), merge (the copies replace the leaves), sharding (a copy takes its leaf's
spec) and the layers that run without a backward pass (those below the lowest copy) are those of
`modules_to_save` copies; this file adds PEFT's targeting and key names. The merged params no
longer hold the original weights, so `jpeft.unmerge` refuses.

Any module that holds parameters itself can be targeted, as in PEFT: RMSNorms (the final
`model.norm`, Qwen3's `q_norm`/`k_norm`), linear layers (weight and bias), embeddings and the head.
A module that contains others (`self_attn`, `model.layers.0`) is refused: PEFT would copy it
whole, a full fine-tune of its parts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jpeft import targeting
from jpeft import tree as jtree
from jpeft.adapter import Adapter
from jpeft.config import PeftConfig
from jpeft.method import (
    PREFIX,
    JobOptionError,
    JobSpec,
    WeightMethod,
    override_tensors,
    register,
)
from jpeft.methods import common
from jpeft.quant import QuantizedTensor
from jpeft.tree import ModuleRef

COPY = "ln_tuning_layers"

_SANDWICH_NORMS = (  # Gemma 2/3's four norms per layer, and the final one
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "norm",
)
# PEFT's per-architecture LN tuning targets (utils/constants.py), used when target_modules is None.
DEFAULT_TARGETS = {
    "llama": ("input_layernorm", "post_attention_layernorm", "norm"),
    "mistral": ("input_layernorm", "post_attention_layernorm", "norm"),
    "qwen2": ("post_attention_layernorm",),
    "qwen3": ("post_attention_layernorm",),
    "gemma": ("input_layernorm", "post_attention_layernorm", "norm"),
    **dict.fromkeys(("gemma2", "gemma3_text"), _SANDWICH_NORMS),
}


@dataclasses.dataclass(frozen=True)
class LNTuningConfig(PeftConfig):
    """PEFT's `LNTuningConfig`: same field names, defaults and JSON."""

    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None


def parameter_modules(params: Mapping[str, Any]) -> dict[str, ModuleRef]:
    """{HF module name: ref} of every module that holds parameters itself, in the per-layer HF
    view; `kind` is "norm" for a 1-D weight, else "embedding" or "linear" as for other methods."""
    leaves: dict[str, list[str]] = {}
    for name in jtree.hf_leaf_names(params):
        module, _, leaf = name.rpartition(".")
        leaves.setdefault(module, []).append(leaf)
    refs = {}
    for module, names in leaves.items():
        leaf = "weight" if "weight" in names else names[0]
        tree_path, layer = jtree.hf_param_path(params, f"{module}.{leaf}")
        shape = jtree.leaf_shape(jtree.get_path(params, jtree.tied_head_source(params, tree_path)))
        shape = shape if layer is None else shape[1:]
        if len(shape) == 1:
            kind = "norm"
        else:
            kind = jtree.module_kind(params, module)
        refs[module] = ModuleRef(module, tree_path.rpartition(".")[0], layer, kind, shape)
    return refs


def resolve_targets(params: Mapping[str, Any], config: LNTuningConfig) -> list[str]:
    """The modules `config` copies, by PEFT's matching rules; ValueError when a module that
    contains others matches, or when nothing does (listing the names available)."""
    refs = parameter_modules(params)
    containers = {name.rsplit(".", i)[0] for name in refs for i in range(1, name.count(".") + 1)}
    for name in sorted(containers - set(refs)):
        if targeting.matches_target(config, ModuleRef(name, name, None, "container", ())):
            inside = sorted(r for r in refs if r.startswith(name + "."))[:3]
            raise ValueError(
                f"LNTuningConfig.target_modules={shown(config.target_modules)!r} matches "
                f"{name!r}, a module that contains others ({', '.join(inside)}, ...); jpeft "
                "copies modules that hold parameters themselves (norms, linear layers, "
                "embeddings): name those, or exclude the container with exclude_modules"
            )
    targets = [name for name, ref in refs.items() if targeting.matches_target(config, ref)]
    if not targets:
        short_names = sorted({name.split(".")[-1] for name in refs})
        raise ValueError(
            f"LNTuningConfig.target_modules={shown(config.target_modules)!r} matched no module "
            f"of the model. Module names available: {short_names}; check exclude_modules and "
            "modules_to_save too"
        )
    return targets


def shown(value: Any) -> Any:
    """A config value as the user wrote it (tuples back to lists)."""
    return list(value) if isinstance(value, tuple) else value


def module_leaves(params: Mapping[str, Any], modules: Sequence[str]) -> list[str]:
    """The HF parameter names (`.weight`, `.bias`) of `modules`; ValueError naming a module whose
    weight is 4-bit quantized (it cannot be copied and trained)."""
    wanted = set(modules)
    names = [n for n in jtree.hf_leaf_names(params) if n.rpartition(".")[0] in wanted]
    for name in names:
        tree_path, _ = jtree.hf_param_path(params, jtree.tied_head_source(params, name))
        if isinstance(jtree.get_path(params, tree_path), QuantizedTensor):
            raise ValueError(
                f"{name} is a 4-bit quantized weight, which LN tuning cannot copy and train; "
                "remove its module from target_modules, or load the model unquantized"
            )
    return names


def in_modules_to_save(config: LNTuningConfig, name: str) -> bool:
    """Whether parameter `name` lies in a `modules_to_save` module (PEFT's rule, as
    `jpeft.targeting.is_excluded`); LN tuning's other overrides are its copies."""
    module = name.rpartition(".")[0]
    return any(
        re.match(rf"(^|.*\.){saved}($|\..*)", module) for saved in config.modules_to_save or ()
    )


def layer_targets(names: Sequence[str], layers: list[int] | None) -> str | list[str]:
    """PEFT target_modules for `names` in `layers` and outside the decoder layers (the final
    norm, the head): a full-match regex (LN tuning has no `layers_to_transform`), or the plain
    names for all layers."""
    if layers is None:
        return list(names)
    alternatives = "|".join(re.escape(name) for name in names)
    indices = "|".join(str(i) for i in layers)
    return rf"model\.layers\.({indices})\.(\w+\.)*({alternatives})|(model\.)?({alternatives})"


@register
class LNTuning(WeightMethod):
    """LN tuning: the targeted modules' parameters trained as copies (`Adapter.overrides`)."""

    peft_type = "LN_TUNING"
    name = "ln-tuning"
    config_class = LNTuningConfig
    # PEFT's benchmark run at 1e-4 did not learn (0.000 accuracy); norm weights are per-channel
    # scales like IA3's vectors, a little below IA3's 1e-2 as pretrained norms are often < 1.
    default_lr = 3e-3
    job_help = "LN tuning, copies of PEFT's norms for the architecture on the top layers"
    piece_names = (f"{COPY}.weight", f"{COPY}.bias")
    merge_is_invertible = False

    def init_adapter(self, params, config: LNTuningConfig, key, model=None) -> Adapter:
        """Copies of the targeted modules' parameters and of `modules_to_save`, in the base dtype.
        With target_modules None the architecture's defaults are written into the config, as
        PEFT saves the resolved names."""
        model_type = common.model_type_of(model)
        if config.target_modules is None:
            if model_type not in DEFAULT_TARGETS:
                raise ValueError(
                    "LNTuningConfig.target_modules is None and PEFT has no LN tuning default for "
                    f"model type {model_type!r} (defaults exist for {sorted(DEFAULT_TARGETS)}); "
                    "pass target_modules (e.g. the norms' names), or pass model= to init_adapter "
                    "so jpeft knows the model type"
                )
            config = config.replace(target_modules=DEFAULT_TARGETS[model_type])
        copied = module_leaves(params, resolve_targets(params, config))
        saved = targeting.resolve_modules_to_save(params, config.modules_to_save or ())
        return Adapter(config, {}, common.base_leaf_copies(params, [*copied, *saved]))

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        """Never called: an LN tuning adapter has no pieces, only overrides."""
        raise NotImplementedError("LN tuning adapts weights through Adapter.overrides")

    def to_file(self, adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """`<module>.ln_tuning_layers.<weight|bias>` per copy; `modules_to_save` copies under
        their own names."""
        config = adapter.config
        saved = {n: v for n, v in adapter.overrides.items() if in_modules_to_save(config, n)}
        tensors = override_tensors(adapter.replace(overrides=saved))
        for name, value in adapter.overrides.items():
            if name not in saved:
                module, _, leaf = name.rpartition(".")
                tensors[f"{PREFIX}{module}.{COPY}.{leaf}"] = value
        return config.to_dict(), tensors

    def from_file(self, config, tensors, params, source: str) -> Adapter:
        """The copies (read as pieces by `piece_names`) become overrides of their modules'
        parameters, beside the file's `modules_to_save` copies."""
        loaded = super().from_file(config, tensors, params, source)
        copies = {
            f"{module}.{piece.rpartition('.')[2]}": value
            for module, pieces in loaded.weights.items()
            for piece, value in pieces.items()
        }
        return Adapter(config, {}, {**loaded.overrides, **copies})

    def job_config(self, job: JobSpec) -> LNTuningConfig:
        """PEFT's targets for the architecture (or `--target-modules`) in the job's layers, and
        the ones outside the decoder layers (the final norm)."""
        names = job.target_modules or DEFAULT_TARGETS.get(job.model_type)
        if names is None:
            raise JobOptionError(
                f"--method {self.name} needs --target-modules for model type {job.model_type!r} "
                f"(PEFT has LN tuning defaults for {sorted(DEFAULT_TARGETS)})"
            )
        if isinstance(names, str):
            if job.train_layers:
                raise JobOptionError(
                    f"--method {self.name} with a regex --target-modules trains the modules the "
                    "regex names; add --train-layers 0"
                )
            return LNTuningConfig(target_modules=names, **job.common)
        return LNTuningConfig(target_modules=layer_targets(names, job.train_layers), **job.common)
