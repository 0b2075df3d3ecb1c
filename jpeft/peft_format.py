"""PEFT's on-disk format, both ways: `adapter_config.json` + `adapter_model.safetensors`.

What goes into the files is each method's business (`Method.to_file` / `from_file`: LoRA writes
`base_model.model.<module>.lora_A.weight` [r, in] ..., prompt methods `prompt_embeddings`,
AdaLoRA its pruned triplets and `rank_pattern`); this module reads and writes the two files:
the JSON as PEFT writes it (`inference_mode` true, sorted keys), safetensors with PEFT's
`{"format": "pt"}` metadata, contiguous numpy arrays. Only safetensors and JSON are read;
nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jpeft.adapter import Adapter
from jpeft.method import config_from_dict, method_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_pretrained(adapter: Adapter, save_directory: str | os.PathLike) -> None:
    """Write `adapter` in PEFT's layout, loadable by `PeftModel.from_pretrained`."""
    os.makedirs(save_directory, exist_ok=True)
    data, tensors = method_for(adapter.config).to_file(adapter)
    arrays = {key: _to_numpy(value) for key, value in tensors.items()}
    save_file(arrays, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
    data["inference_mode"] = True
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def _to_numpy(value: jax.Array) -> np.ndarray:
    array = np.asarray(jax.device_get(value))
    return np.ascontiguousarray(array)


def load_pretrained(
    directory: str | os.PathLike, params: Mapping[str, Any] | None = None
) -> Adapter:
    """Read an adapter saved by PEFT (or jpeft) from `directory`.

    `params` is needed only where PEFT's file needs the base weights to be read (PiSSA/OLoRA
    adapters saved unconverted: PEFT recomputes their starting factors on load, and so does
    jpeft).
    """
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
    return method_for(config).from_file(config, tensors, params, str(directory))


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
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); is it truncated?"
        ) from None
