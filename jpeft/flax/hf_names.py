"""A Flax model's adapter under another model's module names: PEFT export and import.

A Flax model's module names are its own (`layers.3.mlp.up_proj`); the same model in transformers
names them its way (`model.layers.3.mlp.up_proj`). Where the two models hold the same weights
(in PEFT's [out, in] orientation, which `jpeft.flax`'s kernel views give), renaming the modules is
all a PEFT export needs:

    hf_adapter = rename(adapter, [(r"^layers\\.", "model.layers.")])
    jpeft.save_pretrained(hf_adapter, "out/")   # PeftModel.from_pretrained(hf_model, "out/")
    adapter = rename(jpeft.load_pretrained("out/"), [(r"^model\\.layers\\.", "layers.")])

`rules` are `(pattern, replacement)` pairs applied in order with `re.sub` to every module name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jpeft.adapter import SHARED, Adapter

Rules = Sequence[tuple[str, str]]


def rename(adapter: Adapter, rules: Rules) -> Adapter:
    """`adapter` with its modules (and overrides, frozen state) under the names `rules` give.

    The config then targets exactly the renamed modules (`target_modules` lists them, so PEFT
    wraps those and no other in the target model; `layers_to_transform` / `layers_pattern`, which
    exact names bypass, are cleared); `rank_pattern` / `alpha_pattern` keys, `modules_to_save`
    and IA3's `feedforward_modules` names are renamed by the same rules. ValueError when two
    modules get one name.
    """
    weights = _renamed(adapter.weights, rules, "module")
    overrides = _renamed(adapter.overrides, rules, "parameter")
    frozen = {
        name if name == SHARED else _apply(rules, name): pieces
        for name, pieces in adapter.frozen.items()
    }
    config = adapter.config
    changes: dict[str, Any] = {}
    fields = {field.name for field in dataclasses.fields(config)}
    if "target_modules" in fields and weights:
        changes["target_modules"] = tuple(sorted(weights))
    for field in ("layers_to_transform", "layers_pattern"):
        if field in fields:
            changes[field] = None
    for field in ("rank_pattern", "alpha_pattern"):
        if getattr(config, field, None):
            changes[field] = {_apply(rules, k): v for k, v in getattr(config, field).items()}
    for field in ("modules_to_save", "feedforward_modules"):
        value = getattr(config, field, None)
        if value and not isinstance(value, str):
            changes[field] = tuple(_apply(rules, name) for name in value)
    return Adapter(config.replace(**changes), weights, overrides, frozen)


def _apply(rules: Rules, name: str) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def _renamed(entries: Mapping[str, Any], rules: Rules, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name, value in entries.items():
        new = _apply(rules, name)
        if new in out:
            raise ValueError(
                f"renaming gives the {what}s {source[new]!r} and {name!r} one name, {new!r}; "
                "make the rules map distinct names to distinct names"
            )
        out[new], source[new] = value, name
    return out
