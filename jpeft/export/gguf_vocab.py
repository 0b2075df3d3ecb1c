"""The tokenizer metadata (`tokenizer.*`) of a GGUF export, as llama.cpp reads it.

From a GGUF base the `tokenizer.*` keys are copied unchanged. From a Hugging Face folder a
byte-level BPE tokenizer (Llama 3, Qwen2/3, SmolLM, GPT-2 style) is written the way llama.cpp's
`convert_hf_to_gguf.py` writes one (`tokenizer.ggml.model = "gpt2"`): the token list padded to
the embedding rows, token types, merges, the pre-tokenizer name llama.cpp splits text with, the
special token ids, whether a BOS/EOS is added, and the chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType, GGUFWriter, TokenType

from jpeft.gguf_file import is_gguf_path, open_reader
from jpeft.tokenizer import load_tokenizer

# The HF pre-tokenizer regexes llama.cpp's `llama-vocab.cpp` quotes for its pre-tokenizer types.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
# `tokenizer.ggml.pre` of each HF pre-tokenizer llama.cpp implements, by the pre-tokenizer's
# steps (see `_pre_tokenizer_steps`).
_PRE_TOKENIZERS = {
    (("ByteLevel", True, False),): "gpt-2",
    (("Digits", True), ("ByteLevel", True, False)): "smollm",
    (("Split", _LLAMA3_REGEX), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", _QWEN2_REGEX), ("ByteLevel", False, False)): "qwen2",
}
_SPECIAL_TOKENS = ("bos", "eos", "unk", "pad")


def copy_fields(writer: GGUFWriter, reader: GGUFReader, keep: Callable[[str], bool]) -> None:
    """Copy the metadata keys of `reader` for which `keep(key)` holds into `writer`, with their
    GGUF value types."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not keep(key):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type)


def add_tokenizer(
    writer: GGUFWriter, base: str | Path, vocab_size: int, config: Mapping[str, Any]
) -> None:
    """The `tokenizer.*` metadata of `base`: a GGUF file's copied, a HF folder's built (see
    `add_hf_tokenizer`, also for `vocab_size` and `config`)."""
    if not is_gguf_path(base):
        add_hf_tokenizer(writer, base, vocab_size, config)
        return
    reader = open_reader(base)
    if "tokenizer.ggml.model" not in reader.fields:
        raise ValueError(
            f"GGUF base {base} has no tokenizer (no tokenizer.ggml.model); pass tokenizer=False "
            "to export the weights without one"
        )
    copy_fields(writer, reader, lambda key: key.startswith("tokenizer."))


def add_hf_tokenizer(
    writer: GGUFWriter, folder: str | Path, vocab_size: int, config: Mapping[str, Any]
) -> None:
    """The `tokenizer.*` metadata of the byte-level BPE tokenizer in HF folder `folder`, for a
    model with `vocab_size` embedding rows; `config` (its config.json) gives special token ids
    the tokenizer lacks. ValueError when there is no tokenizer or llama.cpp cannot run it."""
    tokenizer = _load(folder)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    _check_byte_level_bpe(model, folder)
    tokens, types = _token_list(tokenizer, vocab_size, folder)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend.get("pre_tokenizer"), folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([_merge_text(merge) for merge in model["merges"]])
    _add_special_tokens(writer, tokenizer, _special_token_ids(tokenizer, config, vocab_size))
    template = tokenizer.chat_template
    if isinstance(template, Mapping):  # named templates: llama.cpp's list form
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


def _check_byte_level_bpe(model: Mapping[str, Any], folder: Any) -> None:
    """ValueError unless tokenizer.json's `model` is a byte-level BPE (no byte fallback)."""
    if model["type"] != "BPE" or model.get("byte_fallback"):
        kind = "sentencepiece-style BPE" if model["type"] == "BPE" else f"a {model['type']} model"
        raise ValueError(
            f"the tokenizer of {folder} is {kind}; jpeft writes byte-level BPE tokenizers only. "
            "Export from the base's GGUF file (its tokenizer is copied), or write the vocabulary "
            "with llama.cpp's convert_hf_to_gguf.py"
        )


def _add_special_tokens(writer: GGUFWriter, tokenizer: Any, ids: Mapping[str, int]) -> None:
    """The special token ids, and whether the tokenizer adds a BOS / EOS (seen by encoding)."""
    for kind, token_id in ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    added = len(with_special) > len(plain)
    writer.add_add_bos_token(added and with_special[0] == ids.get("bos"))
    writer.add_add_eos_token(added and with_special[-1] == ids.get("eos"))


def _load(folder: str | Path) -> Any:
    """The tokenizer of HF folder `folder`, a fast one."""
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot export the tokenizer of {folder} ({err}); pass tokenizer=False to write a "
            "GGUF without one (llama.cpp then needs token ids, not text)"
        ) from None
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError(f"the tokenizer of {folder} is not a fast one (no tokenizer.json)")
    return tokenizer


def _token_list(tokenizer: Any, vocab_size: int, source: Any) -> tuple[list[str], list[int]]:
    """(token texts, token types) for ids 0..vocab_size-1; ids without a token are unused
    `[PAD<id>]` tokens (the embedding table may be padded past the tokenizer)."""
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(
            f"the tokenizer of {source} has token id {max(by_id)}, but the model has only "
            f"{vocab_size} embedding rows; is it the model's own tokenizer?"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        tokens.append(f"[PAD{token_id}]" if token is None else token)
        if token is None:
            types.append(TokenType.UNUSED)
        elif token_id not in added:
            types.append(TokenType.NORMAL)
        elif added[token_id].special or (token.startswith("<|") and token.endswith("|>")):
            types.append(TokenType.CONTROL)
        else:
            types.append(TokenType.USER_DEFINED)
    return tokens, types


def _pre_tokenizer_steps(pre_tokenizer: Mapping[str, Any] | None) -> tuple[tuple, ...]:
    """The steps of a HF pre-tokenizer, each as (type, the options that change the splits)."""
    if pre_tokenizer is None:
        return ()
    is_sequence = pre_tokenizer["type"] == "Sequence"
    steps = pre_tokenizer["pretokenizers"] if is_sequence else [pre_tokenizer]
    options = {
        "ByteLevel": lambda s: (s.get("use_regex", True), s.get("add_prefix_space", False)),
        "Digits": lambda s: (s.get("individual_digits", False),),
        "Split": lambda s: (s["pattern"].get("Regex", s["pattern"].get("String")),),
    }
    return tuple((s["type"], *options.get(s["type"], lambda _: ())(s)) for s in steps)


def _pre_tokenizer_name(pre_tokenizer: Mapping[str, Any] | None, source: Any) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a HF pre-tokenizer; ValueError for one llama.cpp
    does not implement (its text would be split differently)."""
    steps = _pre_tokenizer_steps(pre_tokenizer)
    if steps not in _PRE_TOKENIZERS:
        raise ValueError(
            f"the tokenizer of {source} pre-tokenizes with {json.dumps(pre_tokenizer)}, which "
            "jpeft cannot name for llama.cpp (known: GPT-2, Llama 3, Qwen2, SmolLM); export from "
            "the base's GGUF file, or write the vocabulary with llama.cpp's convert_hf_to_gguf.py"
        )
    return _PRE_TOKENIZERS[steps]


def _merge_text(merge: str | list[str]) -> str:
    """A BPE merge as llama.cpp stores it: "left right", a space inside a part as U+0120."""
    if isinstance(merge, str):
        return merge
    return " ".join(part.replace(" ", "\u0120") for part in merge)


def _special_token_ids(
    tokenizer: Any, config: Mapping[str, Any], vocab_size: int
) -> dict[str, int]:
    """bos/eos/unk/pad -> id: the tokenizer's, else an int `<kind>_token_id` of config.json."""
    ids = {}
    for kind in _SPECIAL_TOKENS:
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is None:
            token_id = config.get(f"{kind}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            ids[kind] = token_id
    return ids
