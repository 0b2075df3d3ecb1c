"""Tokenizers for the checkpoints `from_pretrained` loads: HF directories and GGUF files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jpeft.gguf_file import is_gguf_path, metadata, open_reader

# A folder holds a tokenizer when it has one of these (transformers would otherwise build an
# empty one from config.json alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def load_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """A `transformers` tokenizer for a HF checkpoint directory or a `.gguf` file.

    `kwargs` go to `AutoTokenizer.from_pretrained` for a directory.
    A GGUF tokenizer is rebuilt from the `tokenizer.ggml.*` metadata (see `gguf_tokenizer`), with
    the `tokenizer.chat_template` when the file has one. Only local files are read. Raises
    FileNotFoundError for a missing path, ValueError naming the file when no tokenizer can be
    built from it (a folder without tokenizer files among them).
    """
    file = Path(path)
    if is_gguf_path(file):
        if not file.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        if kwargs:
            raise ValueError(f"tokenizer options {sorted(kwargs)} apply to directories, not GGUF")
        return gguf_tokenizer(file)
    if not file.is_dir():
        raise FileNotFoundError(f"no checkpoint directory or .gguf file at {str(path)!r}")
    if not any((file / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{str(path)!r} holds no tokenizer: none of {list(TOKENIZER_FILES)}")
    from transformers import AutoTokenizer  # imported here: it is slow and only needed here

    try:
        return AutoTokenizer.from_pretrained(str(file), local_files_only=True, **kwargs)
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"cannot build a tokenizer from {str(path)!r}: {err}") from None


def gguf_tokenizer(file: Path) -> Any:
    """The tokenizer a GGUF file describes, built as transformers' `gguf_file=` loading builds it.

    transformers reads the metadata with a torch-based reader; jpeft reads it with `gguf` and hands
    it to the same torch-free converter, so the tokens are the same without needing torch.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    reader = open_reader(file)
    source = str(file)
    fields = {
        group: {
            name: metadata(reader, f"tokenizer.{key}")
            for key, name in renames.items()
            if f"tokenizer.{key}" in reader.fields
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    spec, options = fields["tokenizer"], fields["tokenizer_config"]
    if "tokens" not in spec:
        raise ValueError(
            f"cannot build a tokenizer from {source}: no tokenizer.ggml.tokens metadata"
        )
    if spec.get("tokenizer_type") == "llama":
        options.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabs
    for name, key in SPECIAL_TOKEN_IDS.items():
        token_id = metadata(reader, f"tokenizer.ggml.{key}", None)
        options[name] = spec["tokens"][token_id] if token_id is not None else None
    architecture = metadata(reader, "general.architecture", source=source)
    try:
        backend, _ = convert_gguf_tokenizer(architecture, spec)
    except (KeyError, ValueError, NotImplementedError) as err:
        raise ValueError(f"cannot build a tokenizer from {source}: {err}") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **options)
