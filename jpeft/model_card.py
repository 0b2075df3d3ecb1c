"""The README.md model card of a saved adapter folder, as PEFT writes one.

PEFT's `save_pretrained` writes (or updates) a README.md at the top of the folder
(`PeftModel.create_or_update_model_card`): YAML front matter with `base_model` (when known),
`library_name: peft`, `tags` and `pipeline_tag: text-generation` for a causal LM, then the text.
jpeft writes the same front matter, tagged with each method (`lora`, `ia3`, ...) and `jpeft`, and a
section saying what the adapter is: the method and the settings that differ from PEFT's defaults,
the trainable parameter count, metrics when given, and how to load it in PEFT and in jpeft.

An existing README.md is kept, as PEFT keeps it: its front matter is updated (tags are added, not
replaced), and jpeft's section, between its two marker comments, is rewritten or else appended.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from jpeft.adapter import Adapter

README_NAME = "README.md"
START = "<!-- jpeft: this section, down to the end marker, is rewritten on every save -->"
END = "<!-- jpeft: end of section -->"
SECTION = re.compile(f"{re.escape(START)}.*?{re.escape(END)}", re.S)
FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)^---[ \t]*(?:\r?\n|\Z)", re.S | re.M)
# Base fields that say nothing about the adapter itself.
NOT_SHOWN = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}
LONGEST_VALUE = 100  # characters of a setting shown; adapter_config.json has them whole
FOLDER = "path/to/this/folder"  # the saved folder, in the loading examples


def model_card(
    adapters: Mapping[str, Adapter],
    metrics: Mapping[str, Any] | None = None,
    existing: str | None = None,
    source: str = README_NAME,
) -> str:
    """The README.md text for the `adapters` {name: Adapter} saved together ("default" at the
    top), updating the `existing` README's text (read from `source`) when there is one."""
    data, text = split_front_matter(existing or "", source)
    data = updated_front_matter(data, adapters)
    section = f"{START}\n{card_section(adapters, metrics)}\n{END}"
    text, replaced = SECTION.subn(lambda _: section, text, count=1)
    if not replaced:
        text = f"{text.rstrip()}\n\n{section}\n" if text.strip() else f"\n{section}\n"
    front = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n{text}"


def split_front_matter(text: str, source: str) -> tuple[dict[str, Any], str]:
    """(the YAML front matter as a dict, the text after it); ValueError naming `source` when the
    front matter is not a YAML mapping."""
    match = FRONT_MATTER.match(text)
    if match is None:
        return {}, text
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())
        raise ValueError(
            f"{source}: its YAML front matter does not parse ({problem}); fix or remove the file"
        ) from None
    if not isinstance(data, (dict, type(None))):
        raise ValueError(
            f"{source}: its YAML front matter is a {type(data).__name__}, not key: value lines; "
            "fix or remove the file"
        )
    return dict(data or {}), text[match.end() :]


def updated_front_matter(data: Mapping[str, Any], adapters: Mapping[str, Adapter]) -> dict:
    """`data` with PEFT's keys set: base_model, library_name, pipeline_tag (a causal LM's, when
    none is given) and tags (the methods, `jpeft`, PEFT's base-model tag, and those there were)."""
    out = dict(data)
    base = base_model(adapters)
    if base is not None:
        out["base_model"] = base
    out["library_name"] = "peft"
    if not out.get("pipeline_tag") and any(
        a.config.task_type == "CAUSAL_LM" for a in adapters.values()
    ):
        out["pipeline_tag"] = "text-generation"
    tags = {a.config.peft_type.lower() for a in adapters.values()} | {"jpeft"}
    if base is not None:
        tags.add(f"base_model:adapter:{base}")
    previous = out.get("tags") or []
    previous = [previous] if isinstance(previous, str) else previous
    out["tags"] = sorted(tags | {str(tag) for tag in previous})
    return out


def base_model(adapters: Mapping[str, Adapter]) -> str | None:
    """The `base_model_name_or_path` of the adapters (the first one set)."""
    names = [a.config.base_model_name_or_path for a in adapters.values()]
    return next((name for name in names if name), None)


def card_section(adapters: Mapping[str, Adapter], metrics: Mapping[str, Any] | None) -> str:
    """jpeft's part of the card, in Markdown."""
    base = base_model(adapters)
    methods = " + ".join(dict.fromkeys(method_name(a) for a in adapters.values()))
    lines = [f"# {methods} adapter" + (f" for {os.path.basename(base)}" if base else ""), ""]
    lines += [
        f"A PEFT adapter{f' for `{base}`' if base else ''}, saved by jpeft (JAX). It loads in "
        "Hugging Face PEFT (PyTorch) and in jpeft; `adapter_config.json` has its whole "
        "configuration.",
        "",
    ]
    for name, adapter in adapters.items():
        heading = "## Adapter" if len(adapters) == 1 else f"## Adapter `{name}`"
        lines += [heading, "", *adapter_lines(adapter), ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {shown_metric(value)} |" for key, value in metrics.items()]
        lines.append("")
    lines += ["## How to load it", "", *loading_lines(base, list(adapters))]
    return "\n".join(lines)


def method_name(adapter: Adapter) -> str:
    """The method as PEFT's config class names it: `LoraConfig` -> "Lora"."""
    return type(adapter.config).__name__.removesuffix("Config")


def adapter_lines(adapter: Adapter) -> list[str]:
    """The method, the trainable parameter count and the settings that differ from PEFT's
    defaults, as a Markdown list."""
    config = adapter.config
    lines = [
        f"- method: `{config.peft_type}` (`{type(config).__name__}`)",
        f"- trainable parameters: {adapter.num_trainable():,}",
    ]
    changed = changed_settings(config)
    if changed:
        lines.append("- settings other than PEFT's defaults:")
        lines += [f"  - `{name}`: `{value}`" for name, value in changed.items()]
    return lines


def changed_settings(config) -> dict[str, str]:
    """{field: its JSON value, cut to LONGEST_VALUE characters} for each field of the config
    whose value is not the field's default (the base fields in NOT_SHOWN left out)."""
    values = config.to_dict()
    changed = {}
    for field in dataclasses.fields(config):
        if field.name in NOT_SHOWN or values[field.name] == _as_json(_default(field)):
            continue
        text = json.dumps(values[field.name])
        cut = text if len(text) <= LONGEST_VALUE else text[: LONGEST_VALUE - 3] + "..."
        changed[field.name] = cut
    return changed


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _as_json(value: Any) -> Any:
    """`value` as JSON reads it back (tuples as lists); itself where it is not JSON."""
    try:
        return json.loads(json.dumps(value))
    except TypeError:
        return value


def shown_metric(value: Any) -> str:
    """A metric's value in the table: counts with thousands separators, 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def loading_lines(base: str | None, names: list[str]) -> list[str]:
    """Markdown: loading the saved adapters `names` with PEFT and with jpeft, on `base` (a .gguf
    file through transformers' `gguf_file`; jpeft reads the file itself)."""
    base = base or "path/to/base_model"
    if base.endswith(".gguf"):
        folder, file = os.path.split(base)
        base_args = f'"{folder or "."}", gguf_file="{file}"'
    else:
        base_args = f'"{base}"'
    paths = {name: FOLDER + ("" if name == "default" else f"/{name}") for name in names}
    named = {name: "" if name == "default" else f', adapter_name="{name}"' for name in names}
    first, *others = names
    pick = f', adapter_name="{first}"' if others else ""  # one of several
    return [
        "With PEFT (PyTorch):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base_args})",
        f'model = PeftModel.from_pretrained(base, "{paths[first]}"{named[first]})',
        *(f'model.load_adapter("{paths[name]}"{named[name]})' for name in others),
        "```",
        "",
        "With jpeft (JAX):",
        "",
        "```python",
        "import jpeft",
        "",
        f'model, params = jpeft.models.from_pretrained("{base}")',
        f'adapter = jpeft.load_pretrained("{FOLDER}", params{pick})',
        "logits = model.apply(params, input_ids, adapter=adapter)",
        "```",
    ]
