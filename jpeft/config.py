"""The base of every method's config: PEFT's field names, frozen and hashable, JSON both ways.

A config is the static part of an `Adapter` pytree, so it must be hashable: lists become tuples and
dicts become `FrozenMap`s when a config is built, and `to_dict` turns them back into the JSON PEFT
writes (`json.dumps(asdict(cfg), indent=2, sort_keys=True)`).

Every field's value is checked against its annotation when a config is built (from Python or from
adapter_config.json), with JSON's types as PEFT reads them: `bool` is true/false only (never an
int), `int` an integer (not a bool, not 8.0: PEFT builds layers of that size and fails on a
float), `float` any finite number, `Sequence[X]` a list, `Mapping[K, V]` a dict.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

from jpeft.json_types import arms, describe, fits, kind

PEFT_VERSION_WRITTEN = "0.21.2"


class FrozenMap(Mapping):
    """An immutable, hashable dict (for `rank_pattern` and other dict fields)."""

    def __init__(self, items: Mapping[str, Any] | None = None):
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return repr(self._items)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenMap({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(_freeze(v) for v in value))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Fields every PEFT config has. Subclasses add their method's fields with PEFT's defaults."""

    peft_type: ClassVar[str] = ""  # set by `jpeft.method.register`
    # PEFT fields jpeft accepts only at their default value: {field: default}.
    UNSUPPORTED: ClassVar[dict[str, Any]] = {}

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: Mapping[str, Any] | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _freeze(getattr(self, field.name)))
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for values PEFT would reject."""

    def replace(self, **changes: Any) -> PeftConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object PEFT writes to adapter_config.json."""
        out = {field.name: _thaw(getattr(self, field.name)) for field in dataclasses.fields(self)}
        out.update({name: default for name, default in self.UNSUPPORTED.items()})
        out["peft_type"] = self.peft_type
        out["peft_version"] = PEFT_VERSION_WRITTEN
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> PeftConfig:
        """Build a config from PEFT's JSON; unknown keys warn, unsupported settings raise."""
        known = {field.name for field in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in cls.UNSUPPORTED:
                if value != cls.UNSUPPORTED[key] and value not in (None, {}, []):
                    raise ValueError(
                        f"{source}: {key}={value!r} is a PEFT option jpeft does not support; "
                        f"only {key}={cls.UNSUPPORTED[key]!r} can be loaded"
                    )
            elif key not in ("peft_type", "peft_version"):
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"{source}: ignoring keys unknown to jpeft's {cls.__name__}: {sorted(unknown)}",
                stacklevel=2,
            )
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


# ---------------------------------------------------------------------------------------------
# field types


def check_field_types(config: PeftConfig) -> None:
    """ValueError naming the field, its value and the type its annotation asks for, for the first
    field whose (frozen) value does not fit it."""
    name = type(config).__name__
    for field, annotation in _field_annotations(type(config)).items():
        value = getattr(config, field)
        if not fits(value, annotation):
            raise ValueError(
                f"{name}.{field} must be {describe(annotation)}, got {_shown(value)} "
                f"({kind(value)}{_hint(field, value, annotation)})"
            )


@functools.cache
def _field_annotations(cls: type) -> dict[str, Any]:
    """{field name: its resolved annotation} of a config dataclass."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as err:
        raise TypeError(
            f"{cls.__name__}'s field annotations must name types importable at runtime (jpeft "
            f"checks every field against its annotation): {err}"
        ) from None
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _hint(field: str, value: Any, annotation: Any) -> str:
    """What to write instead, where it is clear."""
    wants_int = int in arms(annotation)
    if wants_int and isinstance(value, float) and value.is_integer():
        return f"; PEFT fails on a float here: write {field}={int(value)}"
    if wants_int and isinstance(value, bool):
        return "; true/false is not a number in a PEFT config"
    return ""


def _shown(value: Any, limit: int = 60) -> str:
    """`value` as JSON users wrote it (lists, dicts), cut to `limit` characters."""
    text = repr(_thaw(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
