"""PEFT's on-disk format, both ways: `adapter_config.json` + `adapter_model.safetensors`, and
the README.md model card written beside them (`jpeft.model_card`).

What goes into the files is each method's business (`Method.to_file` / `from_file`: LoRA writes
`base_model.model.<module>.lora_A.weight` [r, in] ..., prompt methods `prompt_embeddings`,
AdaLoRA its pruned triplets and `rank_pattern`); this module reads and writes the two files:
the JSON as PEFT writes it (`inference_mode` true, sorted keys), safetensors with PEFT's
`{"format": "pt"}` metadata, contiguous numpy arrays. Only safetensors, JSON and a card's YAML
front matter (`yaml.safe_load`) are read; nothing is ever unpickled.

Loading checks the two files against each other before anything runs: the config's field types
(`jpeft.config`), every tensor floating point and finite (here), and each method's pieces and
ranks against the config (`Method.from_file`). Saving writes both files under temporary names
in the directory and renames them into place, the weights first and the config last, with the
permissions of any file the user creates (the umask applies).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from jpeft.adapter import Adapter
from jpeft.method import config_from_dict, method_for
from jpeft.model_card import README_NAME, model_card

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_ADAPTER = "default"  # PEFT's name of the adapter saved at the top of the directory


def save_pretrained(
    adapter: Adapter | Mapping[str, Adapter],
    save_directory: str | os.PathLike,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """Write `adapter` in PEFT's layout, loadable by `PeftModel.from_pretrained`, with a README.md
    model card as PEFT writes one (`jpeft.model_card`; `metrics` {name: value} go into its table;
    an existing README.md keeps its text).

    A dict {name: Adapter} is written as `PeftModel.save_pretrained` writes several adapters:
    "default" in `save_directory` itself, every other name in `save_directory/<name>/` (PEFT's
    `load_adapter(<dir>/<name>, name)` reads those), and one card at the top.

    Each adapter's two files are written in full under temporary names first, then renamed over
    the old ones (the config last), so an interrupted save leaves the directory's previous files in
    place; the card is renamed into place after them all.
    """
    adapters = _named_adapters(adapter)
    card_path = os.path.join(save_directory, README_NAME)
    card = model_card(adapters, metrics, _read_card(card_path), source=card_path)
    for name, one in adapters.items():
        _write_files(adapter_directory(save_directory, name), _adapter_files(one))
    _write_files(save_directory, {README_NAME: card.encode()})


def _named_adapters(adapter: Adapter | Mapping[str, Adapter]) -> dict[str, Adapter]:
    """{name: Adapter} of what `save_pretrained` was given (one adapter is "default")."""
    adapters = adapter if isinstance(adapter, Mapping) else {DEFAULT_ADAPTER: adapter}
    if not adapters:
        raise ValueError("save_pretrained got an empty dict of adapters; give at least one")
    for name, one in adapters.items():
        check_adapter_name(name)
        if not isinstance(one, Adapter):
            raise TypeError(f"adapter {name!r} is a {type(one).__name__}, not a jpeft.Adapter")
    return dict(adapters)


def _adapter_files(adapter: Adapter) -> dict[str, bytes]:
    """{file name: contents} of one adapter: PEFT's weights, then its config."""
    data, tensors = method_for(adapter.config).to_file(adapter)
    arrays = {key: _to_numpy(value) for key, value in tensors.items()}
    data["inference_mode"] = True
    return {
        WEIGHTS_NAME: save(arrays, metadata={"format": "pt"}),
        CONFIG_NAME: json.dumps(data, indent=2, sort_keys=True).encode(),
    }


def _read_card(path: str) -> str | None:
    """The text of the README.md at `path`, None when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; fix or remove the file") from None


def _write_files(directory: str | os.PathLike, contents: Mapping[str, bytes]) -> None:
    """Each file written whole under a temporary name, then all renamed into place in order."""
    os.makedirs(directory, exist_ok=True)
    temporary = {}
    try:
        for name, content in contents.items():
            temporary[name] = _write_new_file(directory, name, content)
        for name, path in temporary.items():
            os.replace(path, os.path.join(directory, name))
    finally:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)


def _write_new_file(directory: str | os.PathLike, name: str, content: bytes) -> str:
    """A new hidden file in `directory` holding `content`, flushed to disk: its path.

    Created with mode 0o666, which the process's umask narrows, as for any file the user
    creates (safetensors' own writer makes 0o600 files)."""
    path = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    return path


def _to_numpy(value: jax.Array) -> np.ndarray:
    array = np.asarray(jax.device_get(value))
    return np.ascontiguousarray(array)


def load_pretrained(
    directory: str | os.PathLike,
    params: Mapping[str, Any] | None = None,
    adapter_name: str | None = None,
) -> Adapter | dict[str, Adapter]:
    """Read an adapter saved by PEFT (or jpeft) from `directory`.

    A directory holding one adapter gives that Adapter. One in PEFT's multi-adapter layout (see
    `save_pretrained`: adapters in sub-folders by name, "default" at the top) gives a dict
    {name: Adapter}, or, with `adapter_name`, that one adapter.

    `params` is needed only where PEFT's file needs the base weights to be read (PiSSA/OLoRA
    adapters saved unconverted: PEFT recomputes their starting factors on load, and so does
    jpeft) or where an adapter keeps what it replaces (trainable tokens' original rows).
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
        path = adapter_directory(directory, adapter_name)
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise FileNotFoundError(
                f"no adapter {adapter_name!r} in {directory} ({path} has no {CONFIG_NAME}); the "
                f"adapters saved there: {saved_adapter_names(directory)}"
            )
        return _load_one(path, params)
    names = saved_adapter_names(directory)
    if names in ([], [DEFAULT_ADAPTER]):
        return _load_one(directory, params)
    return {name: _load_one(adapter_directory(directory, name), params) for name in names}


def saved_adapter_names(directory: str | os.PathLike) -> list[str]:
    """The adapters in `directory`: "default" when it holds an adapter_config.json itself, then
    every sub-folder that does, sorted."""
    top = [DEFAULT_ADAPTER] if os.path.isfile(os.path.join(directory, CONFIG_NAME)) else []
    try:
        entries = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return top
    nested = [
        name
        for name in entries
        if not name.startswith(".") and os.path.isfile(os.path.join(directory, name, CONFIG_NAME))
    ]
    return top + nested


def adapter_directory(directory: str | os.PathLike, name: str) -> str:
    """Where PEFT keeps adapter `name` of a multi-adapter save: the directory for "default"."""
    return os.fspath(directory) if name == DEFAULT_ADAPTER else os.path.join(directory, name)


def check_adapter_name(name: Any) -> None:
    """ValueError unless `name` can be a sub-folder of the save directory."""
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    if not isinstance(name, str) or name in ("", ".", "..") or name.startswith("."):
        raise ValueError(
            f"adapter name {name!r} cannot name a sub-folder; use a plain name like 'sql'"
        )
    if any(sep in name for sep in separators):
        raise ValueError(f"adapter name {name!r} holds a path separator; use a plain name")


def _load_one(directory: str | os.PathLike, params: Mapping[str, Any] | None) -> Adapter:
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: a PEFT adapter directory needs it")
    try:
        with open(config_path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    config = config_from_dict(data, source=config_path)
    tensors = _read_tensors(directory)
    check_tensor_values(tensors, os.path.join(directory, WEIGHTS_NAME))
    return method_for(config).from_file(config, tensors, params, str(directory))


def check_tensor_values(tensors: Mapping[str, np.ndarray], source: str) -> None:
    """ValueError naming the tensor unless every tensor is floating point and finite, and there
    is at least one. PEFT saves every piece of jpeft's methods (and modules_to_save copies) as
    floats; an int or bool tensor is a damaged or foreign file, and a NaN or inf would run
    through every forward pass."""
    if not tensors:
        raise ValueError(f"{source} holds no tensors; is the adapter file complete?")
    for key, value in tensors.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(
                f"{source}: tensor {key!r} has dtype {value.dtype}, but adapter tensors are "
                "floating point (float32, float16, bfloat16); the file is damaged or not a PEFT "
                "adapter"
            )
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        if bad:
            raise ValueError(
                f"{source}: tensor {key!r} holds {bad} NaN or inf value(s) of {np.size(value)}; "
                "the adapter diverged in training or the file is damaged"
            )


def _read_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = os.path.join(directory, "adapter_model.bin")
        hint = (
            f"; {pickled} exists but jpeft never unpickles: re-save it with safetensors "
            "(PEFT: save_pretrained(..., safe_serialization=True))"
            if os.path.isfile(pickled)
            else ""
        )
        raise FileNotFoundError(f"{path} not found{hint}")
    try:
        return load_file(path)
    # AttributeError: a dtype numpy lacks (safetensors reads float8 as `np.float8_e4m3fn`)
    except (SafetensorError, OSError, ValueError, AttributeError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err!r}); is it truncated, or of a "
            "dtype numpy cannot hold (float8)?"
        ) from None
