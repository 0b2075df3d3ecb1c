"""PEFT's on-disk format, both ways: `adapter_config.json` + `adapter_model.safetensors`.

Weight methods save `base_model.model.<hf module>.<piece>`, the pieces named as each method
registers them (`...q_proj.lora_A.weight` [r, in], `...lora_B.weight` [out, r],
`...lora_magnitude_vector` [out], `...lora_embedding_A` [r, vocab], `...k_proj.ia3_l` [out, 1]);
modules_to_save copies are saved under the module's own name (`base_model.model.lm_head.weight`);
trainable biases under `<module>.base_layer.bias` for targeted modules, `<module>.bias` otherwise.
A method may convert before saving and after loading (LoRA writes PiSSA/OLoRA as the equivalent
plain LoRA of rank 2r, as PEFT's `path_initial_model_for_weight_conversion` does).
Prompt-learning methods save one tensor, `prompt_embeddings`: the prompt encoder's output.
Only safetensors and JSON are read; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jpeft.adapter import PROMPT_ENCODER, Adapter, method_for
from jpeft.config import config_from_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"


def save_pretrained(adapter: Adapter, save_directory: str | os.PathLike) -> None:
    """Write `adapter` in PEFT's layout, loadable by `PeftModel.from_pretrained`."""
    os.makedirs(save_directory, exist_ok=True)
    method = method_for(adapter.config)
    if method.is_prompt_learning:
        tensors = {PROMPT_KEY: _to_numpy(method.prompt_embeddings(adapter))}
    else:
        if method.to_saved is not None:
            adapter = method.to_saved(adapter)
        tensors = {}
        for module, pieces in adapter.weights.items():
            for piece, value in pieces.items():
                tensors[f"{PREFIX}{module}.{piece}"] = _to_numpy(value)
    for name, value in adapter.overrides.items():
        tensors[_override_key(name, adapter.weights)] = _to_numpy(value)
    config = adapter.config
    save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
    data = config.to_dict()
    data["inference_mode"] = True
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def _to_numpy(value: jax.Array) -> np.ndarray:
    array = np.asarray(jax.device_get(value))
    return np.ascontiguousarray(array)


def _override_key(name: str, targeted: Mapping[str, Any]) -> str:
    module, _, leaf = name.rpartition(".")
    if leaf == "bias" and module in targeted:
        return f"{PREFIX}{module}.base_layer.bias"
    return f"{PREFIX}{name}"


def load_pretrained(
    directory: str | os.PathLike, params: Mapping[str, Any] | None = None
) -> Adapter:
    """Read an adapter saved by PEFT (or jpeft) from `directory`.

    `params` is needed only for PiSSA/OLoRA adapters saved unconverted: PEFT recomputes their
    starting factors from the base weights on load, and so does jpeft.
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
    method = method_for(config)
    if method.is_prompt_learning:
        return _prompt_adapter(config, tensors, directory)
    weights: dict[str, dict[str, jax.Array]] = {}
    overrides: dict[str, jax.Array] = {}
    for key, value in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        piece = next((p for p in method.piece_names if name.endswith("." + p)), None)
        if piece is not None:
            weights.setdefault(name[: -len(piece) - 1], {})[piece] = jnp.asarray(value)
        elif name.endswith(".base_layer.weight"):
            continue  # PEFT's copy of an embedding table it targets; the base has it already
        else:
            overrides[name.replace(".base_layer.", ".")] = jnp.asarray(value)
    adapter = Adapter(config, weights, overrides)
    if method.from_saved is not None:
        adapter = method.from_saved(adapter, params, str(directory))
    return adapter


def _prompt_adapter(config, tensors: Mapping[str, np.ndarray], directory) -> Adapter:
    """PEFT saves a prompt-learning adapter as the encoder's output alone; like PEFT's inference
    load, it becomes the encoder's embedding and is used as is."""
    if set(tensors) != {PROMPT_KEY}:
        raise ValueError(
            f"{directory}: a {config.peft_type} adapter file holds one tensor, {PROMPT_KEY!r}; "
            f"found {sorted(tensors)}"
        )
    embedding = {"embedding.weight": jnp.asarray(tensors[PROMPT_KEY])}
    return Adapter(config, {PROMPT_ENCODER: embedding})


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
