"""Tokenizers for the checkpoints `from_pretrained` loads: HF directories and GGUF files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jpeft.models.gguf_loading import is_gguf_path


def load_tokenizer(path: str | Path) -> Any:
    """A `transformers` tokenizer for a HF checkpoint directory or a `.gguf` file.

    A GGUF tokenizer is rebuilt by transformers from the `tokenizer.ggml.*` metadata, with the
    `tokenizer.chat_template` when the file has one. Only local files are read. Raises
    FileNotFoundError for a missing path, ValueError naming the file when no tokenizer can be
    built from it.
    """
    from transformers import AutoTokenizer  # imported here: it is slow and only needed here

    file = Path(path)
    if is_gguf_path(file):
        if not file.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        location, options = file.parent, {"gguf_file": file.name}
    elif file.is_dir():
        location, options = file, {}
    else:
        raise FileNotFoundError(f"no checkpoint directory or .gguf file at {str(path)!r}")
    try:
        return AutoTokenizer.from_pretrained(str(location), local_files_only=True, **options)
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"cannot build a tokenizer from {str(path)!r}: {err}") from None
