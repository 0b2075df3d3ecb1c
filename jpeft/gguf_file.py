"""Reading GGUF files (llama.cpp's format): opening one with clear errors, and its metadata.

Low in the layering on purpose: the model loader and the tokenizer both read GGUF files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader

REQUIRED = object()


def is_gguf_path(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its `.gguf` suffix; it need not exist)."""
    return Path(path).suffix.lower() == ".gguf"


def open_reader(path: str | Path) -> GGUFReader:
    """A memory-mapped reader of GGUF file `path`: FileNotFoundError when it is missing,
    ValueError naming it when it is not a readable little-endian GGUF file."""
    source = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"GGUF file {source!r} does not exist")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader reports bad files with assorted exception types
        raise ValueError(f"{source!r} is not a readable GGUF file ({err})") from None
    if reader.byte_order != "I":
        raise ValueError(f"{source!r} is a byte-swapped (big-endian) GGUF file; not supported")
    return reader


def metadata(reader: GGUFReader, key: str, default: Any = REQUIRED, source: str = "") -> Any:
    """The value of metadata `key` (int, float, bool, str or list), or `default` if absent."""
    field = reader.get_field(key)
    if field is not None:
        return field.contents()
    if default is REQUIRED:
        raise ValueError(f"GGUF file {source!r} has no metadata key {key!r}")
    return default
