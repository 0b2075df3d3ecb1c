"""Whether a JSON value fits a type annotation, and how to say what it should have been.

JSON's types as PEFT and jpeft read them: `bool` is true/false only (never an int), `int` an
integer (not a bool, not 8.0), `float` any finite number, `Sequence[X]` / `list[X]` a list,
`Mapping[K, V]` / `dict[K, V]` an object, `Literal[...]` one of its values, unions any arm. Used
for adapter configs (`jpeft.config`) and `jpeft finetune`'s `--config` files alike.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal


def arms(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union (`int | None`, `Optional[int]`), or the annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value (lists may be tuples, dicts any Mapping) fits `annotation`."""
    if len(arms(annotation)) > 1:
        return any(fits(value, arm) for arm in arms(annotation))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation in (None, type(None)):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if origin is Literal:
        return value in args
    if origin in (Mapping, dict):
        key_type, value_type = args or (Any, Any)
        return isinstance(value, Mapping) and all(
            fits(k, key_type) and fits(v, value_type) for k, v in value.items()
        )
    if origin in (Sequence, list, tuple):
        item_type = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(fits(item, item_type) for item in value)
    return not isinstance(annotation, type) or isinstance(value, annotation)


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


_SINGULAR = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
    type(None): "null",
}
_PLURAL = {bool: "true/false", int: "integers", float: "numbers", str: "strings", Any: "values"}


def describe(annotation: Any) -> str:
    """What `annotation` asks for, in JSON's words ("a string, a list of strings or null")."""
    words = [_describe_one(arm) for arm in arms(annotation)]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _describe_one(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " or ".join(repr(arg) for arg in args)
    if origin in (Mapping, dict):
        key_type, value_type = args or (Any, Any)
        return f"a dict of {_plural(key_type)} to {_plural(value_type)}"
    if origin in (Sequence, list, tuple):
        return f"a list of {_plural(args[0] if args else Any)}"
    if annotation in (None, type(None)):
        return "null"
    return _SINGULAR.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _plural(annotation: Any) -> str:
    if annotation in _PLURAL:
        return _PLURAL[annotation]
    return _describe_one(annotation).replace("a list of", "lists of").replace("a dict", "dicts")


_KINDS = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}


def kind(value: Any) -> str:
    """The JSON kind of a value (tuples are lists), for messages: "a float", "a list"."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a dict"
    return _KINDS.get(type(value), f"a {type(value).__name__}")
