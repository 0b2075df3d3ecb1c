"""PEFT's module matching rules, applied to the per-layer HF view of a param tree.

The rules follow `peft.tuners.tuners_utils.check_target_module_exists`:
- `exclude_modules` wins; a string is `re.fullmatch`ed, a list matches an exact name or a suffix
  after a dot;
- modules named in `modules_to_save` are never targeted;
- a string `target_modules` is `re.fullmatch`ed against the full module name; `"all-linear"` means
  every linear layer except the output head; a list matches an exact name, or a suffix after a
  dot, and only such suffix matches are filtered by `layers_to_transform` / `layers_pattern`;
- `rank_pattern` / `alpha_pattern` keys match `(.*\\.)?(key)$`, first match in dict order wins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from jpeft.tree import ModuleRef, hf_leaf_names, hf_modules

ALL_LINEAR = "all-linear"
OUTPUT_HEAD_NAMES = ("lm_head",)

# PEFT's per-architecture LoRA defaults when `target_modules` is None (utils/constants.py).
DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
}


def _matches_name_list(names: Sequence[str], key: str) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)


def is_excluded(config: Any, key: str) -> bool:
    """True when `exclude_modules` or `modules_to_save` rule the module out."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif _matches_name_list(exclude, key):
            return True
    for module in getattr(config, "modules_to_save", None) or ():
        if re.match(rf"(^|.*\.){module}($|\..*)", key):
            return True
    return False


def layer_index(key: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The layer index PEFT reads from a module name: the first numbered segment."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def matches_target(config: Any, ref: ModuleRef) -> bool:
    """Whether PEFT would put an adapter on module `ref` for this config."""
    key = ref.name
    if is_excluded(config, key):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return ref.kind == "linear" and key.split(".")[-1] not in OUTPUT_HEAD_NAMES
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True  # PEFT applies layers_to_transform to suffix matches only
    if not any(key.endswith(f".{name}") for name in targets):
        return False
    wanted_layers = getattr(config, "layers_to_transform", None)  # LoRA's; IA3 has none
    if wanted_layers is None or (isinstance(wanted_layers, Sequence) and len(wanted_layers) == 0):
        return True
    index = layer_index(key, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    if isinstance(wanted_layers, int):
        return index == wanted_layers
    return index in wanted_layers


def pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """`rank_pattern` / `alpha_pattern` lookup: the first key matching `(.*\\.)?(key)$`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def resolve_targets(
    params: Mapping[str, Any],
    config: Any,
    model_type: str | None = None,
    defaults: Mapping[str, Sequence[str]] = DEFAULT_TARGETS,
) -> list[ModuleRef]:
    """The modules of `params` that `config` targets, in the per-layer HF view.

    `defaults` are the method's per-architecture targets, used when `target_modules` is None.

    Raises ValueError naming the targets and listing the available module names when nothing
    matches, as PEFT does.
    """
    if config.target_modules is None:
        if model_type not in defaults:
            raise ValueError(
                f"target_modules is None and there is no default for model type {model_type!r}; "
                f"pass target_modules explicitly (defaults exist for {sorted(defaults)}; pass "
                "model= to init_adapter so jpeft knows the model type)"
            )
        config = config.replace(target_modules=tuple(defaults[model_type]))
    modules = hf_modules(params)
    heads = getattr(params, "output_heads", ())  # a jpeft.flax model's own head, if it has one
    matched = [ref for ref in modules if matches_target(config, ref)]
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        matched = [ref for ref in matched if ref.name not in heads]
    if not matched:
        targets = config.target_modules
        shown = list(targets) if isinstance(targets, tuple) else targets
        short_names = sorted({ref.name.split(".")[-1] for ref in modules})
        example = modules[-1].name if modules else None
        raise ValueError(
            f"target_modules={shown!r} matched no module of the model. Module names available: "
            f"{short_names} (full names look like {example!r}); check exclude_modules, "
            "layers_to_transform and modules_to_save too"
        )
    return matched


def resolve_modules_to_save(params: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """HF parameter names of every leaf inside the modules named in `modules_to_save`."""
    paths = []
    for path in hf_leaf_names(params):
        module = path.rsplit(".", 1)[0]
        if any(re.match(rf"(^|.*\.){name}$", module) for name in names):
            paths.append(path)
    if names and not paths:
        raise ValueError(
            f"modules_to_save={list(names)!r} matched no module of the model; "
            f"top-level modules: {sorted(params)}"
        )
    return paths
