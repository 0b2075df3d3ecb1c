"""A merged model as a Hugging Face checkpoint folder that `from_pretrained` loads.

The folder holds `config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors`
shards and `model.safetensors.index.json` above `max_shard_size`), `generation_config.json` and
the tokenizer files. The base may be a HF checkpoint folder (its config is kept, with the dtype,
tying and quantization updated) or a GGUF file (the config is rebuilt from its metadata, as
jpeft loads it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.adapter import Adapter
from jpeft.export.merged import export_dtype, is_tied, iter_hf_tensors, merged_params, to_numpy
from jpeft.export.staging import staged_dir
from jpeft.gguf_file import is_gguf_path, metadata
from jpeft.models import gguf_loading, hf_loading, safetensors_file
from jpeft.quant import QuantizedTensor
from jpeft.quant.bnb_state import to_bnb
from jpeft.tokenizer import load_tokenizer

DEFAULT_MAX_SHARD_SIZE = "5GB"
GENERATION_CONFIG_FILE = "generation_config.json"
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_SIZE_UNITS["GIB"] = 2**30


def save_merged_checkpoint(
    out: str | os.PathLike,
    base: str | os.PathLike,
    params: Mapping[str, Any],
    adapter: Adapter | None = None,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    keep_4bit: bool = False,
    tokenizer: bool = True,
) -> Path:
    """Write `params` (loaded from checkpoint `base`) with `adapter` merged in as a new HF
    checkpoint folder `out`; returns its path. Written whole or not at all; `out` must be new.

    dtype: "float32", "float16" or "bfloat16" for the float tensors (default: the params' own).
    keep_4bit: keep 4-bit (QLoRA) weights as bitsandbytes 4-bit entries with a
        `quantization_config` that transformers loads (the merged weights are quantized again,
        see `jpeft.merge`); by default they are dequantized.
    tokenizer: also write the base's tokenizer files (ValueError when it has none).
    """
    limit = parse_size(max_shard_size)
    tokenizer_files = _tokenizer(base) if tokenizer else None
    merged = merged_params(params, adapter, keep_4bit=keep_4bit)
    np_dtype = export_dtype(dtype, merged)
    tensors = list(_checkpoint_tensors(merged, np_dtype))
    quantized = [leaf for _, leaf in iter_hf_tensors(merged) if isinstance(leaf, QuantizedTensor)]
    if keep_4bit and not quantized:
        raise ValueError("keep_4bit=True, but the params hold no 4-bit weights to keep")
    config = hf_config(base, np_dtype.name, is_tied(merged))
    if quantized:
        config["quantization_config"] = _bnb_config(quantized, np_dtype.name)
    with staged_dir(out, "export folder") as folder:
        _write_weights(folder, tensors, limit)
        (folder / hf_loading.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _write_generation_config(folder, base, config)
        if tokenizer_files is not None:
            tokenizer_files.save_pretrained(str(folder))
    return Path(os.path.abspath(out))


def _tokenizer(base: str | os.PathLike) -> Any:
    try:
        return load_tokenizer(base)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot export the tokenizer of {base} ({err}); pass tokenizer=False (jpeft export "
            "--no-tokenizer) to export the weights without one"
        ) from None


def parse_size(size: int | str) -> int:
    """Bytes of a size given as an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size {size!r}: give a positive size such as '5GB' or '500MB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _checkpoint_tensors(merged: Mapping[str, Any], dtype: np.dtype):
    """`(name, host array)` in checkpoint order; a 4-bit weight as its bitsandbytes entries."""
    for name, leaf in iter_hf_tensors(merged):
        if isinstance(leaf, QuantizedTensor):
            yield from to_bnb(leaf, prefix=name[: -len("weight")]).items()
        else:
            yield name, to_numpy(leaf, dtype)


def hf_config(base: str | os.PathLike, dtype: str, tied: bool) -> dict[str, Any]:
    """The `config.json` of the export: the base's own (a HF folder), or the one its GGUF
    metadata implies, with `dtype` and `tie_word_embeddings` set and no quantization."""
    if is_gguf_path(base):
        config = _config_from_gguf(base)
    else:
        config = hf_loading.read_config(base)
        config.pop("quantization_config", None)
    config.pop("torch_dtype", None)  # transformers 5 names it `dtype`
    config["dtype"] = dtype
    config["tie_word_embeddings"] = tied
    return config


def _config_from_gguf(path: str | os.PathLike) -> dict[str, Any]:
    source = str(path)
    reader = gguf_loading.open_gguf(path)
    config = gguf_loading.hf_config_from_gguf(reader, source)
    config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    for field, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token = metadata(reader, f"tokenizer.ggml.{key}_token_id", None, source)
        if token is not None:
            config[f"{field}_token_id"] = int(token)
    return config


def _bnb_config(quantized: list[QuantizedTensor], dtype: str) -> dict[str, Any]:
    """transformers' bitsandbytes `quantization_config` for the 4-bit weights `quantized`."""
    formats = {(q.quant_type, q.double_quant) for q in quantized}
    if len(formats) > 1:
        raise ValueError(
            f"the 4-bit weights mix formats (quant_type, double_quant) {sorted(formats)}; a "
            "checkpoint's quantization_config describes one: export without keep_4bit"
        )
    ((quant_type, double_quant),) = formats
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": "uint8",
    }


def _write_weights(folder: Path, tensors: list[tuple[str, np.ndarray]], limit: int) -> None:
    """One safetensors file, or shards of at most `limit` bytes (a larger tensor alone) and the
    index, named as transformers names them."""
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, array in tensors:
        if shards[-1] and size + array.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, array))
        size += array.nbytes
    file_metadata = {"format": "pt"}
    if len(shards) == 1:
        safetensors_file.write(folder / hf_loading.WEIGHTS_FILE, shards[0], file_metadata)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += safetensors_file.write(folder / file, shard, file_metadata)
        weight_map.update({name: file for name, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / hf_loading.WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_generation_config(folder: Path, base: str | os.PathLike, config: dict) -> None:
    """The base folder's generation config, or one with the config's special token ids."""
    source = Path(base) / GENERATION_CONFIG_FILE
    if not is_gguf_path(base) and source.is_file():
        shutil.copyfile(source, folder / GENERATION_CONFIG_FILE)
        return
    from transformers import GenerationConfig  # imported here: slow, and only needed here

    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    GenerationConfig(**ids).save_pretrained(str(folder))
