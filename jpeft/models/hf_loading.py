"""Hugging Face configs and safetensors checkpoints -> `(LlamaForCausalLM, params)`.

Loading streams: `iter_checkpoint_tensors` yields `(hf_name, np.ndarray)` one tensor at a time
from the safetensors files (plain reads, see `safetensors_file`), and `place_tensors` copies each
into preallocated stacked numpy buffers (casting to the target dtype); a linear weight to be
quantized is quantized as it arrives instead, and a bitsandbytes 4-bit checkpoint's weights arrive
already quantized (see `bnb_checkpoint`). Pickled checkpoints (`pytorch_model.bin`) are never
opened.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as jtree
from jpeft.models import safetensors_file
from jpeft.models.inputs import float_dtype
from jpeft.models.llama import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    LlamaForCausalLM,
    ModelConfig,
    Params,
    is_shape,
    param_shapes,
)
from jpeft.models.rope import RopeScaling
from jpeft.quant import QuantConfig, QuantizedTensor, default_compute_dtype, stack

GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", *GEMMA_MODEL_TYPES)
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def from_hf_config(hf_config: Any) -> LlamaForCausalLM:
    """A model from a `transformers` config object or its dict (the contents of config.json)."""
    return LlamaForCausalLM(config_from_hf(hf_config))


def config_from_hf(hf_config: Any) -> ModelConfig:
    """Translate a `transformers` config (object or dict) into a `ModelConfig`."""
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    for arch in d.get("architectures") or ():
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
            )
    missing = [f for f in _REQUIRED_FIELDS if d.get(f) is None]
    if missing:
        raise ValueError(f"{model_type} config is missing required field(s) {missing}")
    heads = d["num_attention_heads"]
    qwen2 = model_type == "qwen2"
    attention_bias = qwen2 or bool(d.get("attention_bias", False))
    gemma = _gemma_fields(d, model_type) if model_type in GEMMA_MODEL_TYPES else {}
    theta, scaling = _rope_from_hf(gemma.pop("rope", d))
    window, layer_types = _attention_layout(d, model_type)
    fields = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        model_type=model_type,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_proj_bias=attention_bias and not qwen2,
        mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=window,
        layer_types=layer_types,
        hidden_act=d.get("hidden_act", "silu"),
    )
    return ModelConfig(**{**fields, **gemma})


def _gemma_fields(d: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The `ModelConfig` fields a Gemma 1/2/3 config sets beyond Llama's, as transformers reads
    them; "rope" holds the config dict `_rope_from_hf` reads the global RoPE from."""
    if d.get("use_bidirectional_attention"):
        raise ValueError(
            f"{model_type} config has use_bidirectional_attention=True (an encoder, e.g. "
            "EmbeddingGemma); jpeft runs Gemma as a causal LM"
        )
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    fields: dict[str, Any] = dict(
        norm_style="gemma",
        embed_scale=True,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        hidden_act="gelu_pytorch_tanh" if model_type == "gemma" and act == "gelu" else act,
        rope=d,
    )
    if model_type == "gemma":
        return fields
    fields.update(
        sandwich_norms=True,
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or 256),
        final_logit_softcapping=d.get("final_logit_softcapping"),
    )
    if model_type == "gemma2":
        fields["attn_logit_softcapping"] = d.get("attn_logit_softcapping")
        return fields
    fields["qk_norm"] = True  # gemma3_text: its attn_logit_softcapping is ignored, as there
    rope = dict(d.get("rope_parameters") or {})
    if "full_attention" in rope:  # transformers 5: one RoPE per layer type
        fields["rope"] = {"rope_parameters": rope["full_attention"]}
        local = rope.get("sliding_attention") or {}
    else:  # config.json of the Hub: flat keys, rope_scaling for the global layers only
        fields["rope"] = {
            "rope_theta": d.get("rope_theta", 1_000_000.0),
            "rope_scaling": d.get("rope_scaling"),
            "max_position_embeddings": d.get("max_position_embeddings"),
        }
        local = {"rope_theta": d.get("rope_local_base_freq", 10_000.0)}
    if local.get("rope_type", "default") != "default":
        raise ValueError(
            f"gemma3_text config: the sliding layers' rope_type={local['rope_type']!r}; jpeft "
            "runs them with the default RoPE (as every Gemma 3 release does)"
        )
    fields["rope_local_theta"] = float(local.get("rope_theta", 10_000.0))
    return fields


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(`rope_theta`, scaling) from `rope_parameters` (transformers 5) or `rope_scaling`."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (only 1.0)"
        )
    if rope_type == "default":
        return theta, None
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
    missing = [k for k in required.get(rope_type, ()) if k not in rope]
    if missing:
        raise ValueError(f"rope_type={rope_type!r} needs {missing} in the rope parameters: {rope}")
    fields = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor") if k in rope}
    original = rope.get("original_max_position_embeddings", d.get("max_position_embeddings"))
    if original is not None:
        fields["original_max_position_embeddings"] = int(original)
    return theta, RopeScaling(rope_type=rope_type, **fields)


def _attention_layout(d: Mapping[str, Any], model_type: str) -> tuple[int | None, tuple[str, ...]]:
    """(`sliding_window`, per-layer `layer_types`) as transformers builds them for `model_type`.

    Mistral slides every layer when `sliding_window` is set; Gemma 2 every other layer, Gemma 3
    all but every `sliding_window_pattern`-th (unless `layer_types` says); Qwen2/3 only with
    `use_sliding_window`, on the layers `layer_types` marks (default: from `max_window_layers` on).
    An empty `layer_types` lets `ModelConfig` apply one kind to all layers.
    """
    window = d.get("sliding_window")
    if model_type == "mistral":
        return window, ()
    if model_type in ("gemma2", "gemma3_text"):
        pattern = 2 if model_type == "gemma2" else d.get("sliding_window_pattern") or 6
        n = d["num_hidden_layers"]
        types = d.get("layer_types") or [
            SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(n)
        ]
        return window or 4096, tuple(types)
    if model_type not in ("qwen2", "qwen3") or not d.get("use_sliding_window") or window is None:
        return None, ()
    n = d["num_hidden_layers"]
    first_sliding = d.get("max_window_layers", n)
    types = d.get("layer_types") or [
        SLIDING_ATTENTION if i >= first_sliding else FULL_ATTENTION for i in range(n)
    ]
    unknown = sorted(set(types) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unknown:
        raise ValueError(f"layer_types has unsupported entries {unknown}")
    return window, tuple(types)


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of checkpoint directory `path` (ValueError naming the file
    when it is not a JSON object)."""
    file = Path(path) / CONFIG_FILE
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint directory or .gguf file at {str(path)!r}")
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in checkpoint directory {str(path)!r}")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); is it damaged?") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, not {type(config).__name__}")
    return config


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of checkpoint directory `path`: one file, or the indexed shards."""
    root = Path(path)
    if (root / WEIGHTS_FILE).is_file():
        return [root / WEIGHTS_FILE]
    index = root / WEIGHTS_INDEX_FILE
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        absent = [s for s in shards if not (root / s).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) {absent} that do not exist")
        return [root / s for s in shards]
    if any(root.glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"{root} has only pickled pytorch_model*.bin weights, which jpeft never unpickles; "
            "convert them to safetensors, e.g. transformers' "
            "`save_pretrained(dir, safe_serialization=True)`"
        )
    raise FileNotFoundError(f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {str(root)!r}")


def checkpoint_keys(path: str | Path) -> list[str]:
    """The tensor names of the checkpoint, read from the safetensors headers only."""
    return [name for file in checkpoint_files(path) for name in safetensors_file.header(file)]


def iter_checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_name, array)` for each tensor of the checkpoint, one at a time.

    Each tensor is read into its own array (no memory map, whose touched pages would count
    towards the process's resident memory until the whole file is closed).
    """
    for file in checkpoint_files(path):
        yield from safetensors_file.read_tensors(file)


def hf_names(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """HF tensor name -> (key path in the param tree, layer index or None if not stacked)."""
    leaves = jax.tree.flatten_with_path(param_shapes(config), is_leaf=is_shape)[0]
    names = {}
    for key_path, _ in leaves:
        path = tuple(k.key for k in key_path)
        if path[:2] == ("model", "layers"):
            for i in range(config.num_hidden_layers):
                names[".".join(("model", "layers", str(i), *path[2:]))] = (path, i)
        else:
            names[".".join(path)] = (path, None)
    return names


def place_tensors(
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray | QuantizedTensor]],
    dtype: Any = jnp.float32,
    source: str = "checkpoint",
    quantization: QuantConfig | None = None,
    place: Placer | None = None,
) -> Params:
    """Copy streamed `(hf_name, array)` pairs into the stacked param tree, cast to `dtype`.

    With `quantization`, each linear weight it covers is cast to `dtype` and quantized as it
    arrives, so no float copy of those weights is kept. A value that is already a
    `QuantizedTensor` (a bitsandbytes checkpoint) is placed as it is. Layers of a stacked weight
    are stacked at the end, and each buffer becomes a device array in turn.
    `place(path, value, stacked)` puts each finished leaf on its devices (default: the default
    device); `jpeft.sharding.loading_placer` puts only each device's part there.

    Raises ValueError naming `source` and the tensor on a wrong shape or dtype, NaN or inf
    values, an unexpected name or missing tensors, and on a `dtype` that is not floating point.
    `lm_head.weight` is skipped when the config ties embeddings.
    """
    np_dtype = float_dtype(dtype)
    place = place or _on_default_device
    names = hf_names(config)
    shapes = param_shapes(config)
    buffers: dict[tuple[str, ...], np.ndarray] = {}  # stacked leaves, filled layer by layer
    leaves: dict[tuple[str, ...], Any] = {}
    quantized: dict[tuple[str, ...], dict[int | None, QuantizedTensor]] = {}
    seen, unexpected = set(), []
    for name, array in tensors:
        if name not in names:
            if not _ignorable(config, name):
                unexpected.append(name)
            continue
        path, layer = names[name]
        expected = _layer_shape(shapes, path)
        is_quantized = isinstance(array, QuantizedTensor)
        if not is_quantized:
            _check_values(array, name, source)
        shape = tuple(array.weight_shape if is_quantized else array.shape)
        if shape != expected:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {shape}, expected {expected} for this "
                f"{config.model_type} config"
            )
        module_path = ".".join(path[:-1])
        if not is_quantized and quantization and quantization.quantizes(module_path, shape):
            array = quantization.quantize(array.astype(np_dtype, copy=False), name=name)
            is_quantized = True
        if is_quantized:
            quantized.setdefault(path, {})[layer] = array
        elif layer is None:  # complete: straight to the device, one copy
            leaves[path] = place(".".join(path), array.astype(np_dtype, copy=False), False)
        else:
            if path not in buffers:
                buffers[path] = np.empty(_get(shapes, path), np_dtype)
            buffers[path][layer] = array.astype(np_dtype, copy=False)
        seen.add(name)
        del array  # before the next tensor is read
    if unexpected:
        raise ValueError(
            f"{source} has {len(unexpected)} tensor(s) this {config.model_type} config does not "
            f"use, e.g. {unexpected[:5]}"
        )
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"{source} is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    for path, layers in quantized.items():
        leaves[path] = place(
            ".".join(path), _stack_quantized(layers, source, path), None not in layers
        )
    for path in list(buffers):
        leaves[path] = place(".".join(path), buffers.pop(path), True)
    return jtree.unflatten({".".join(path): leaf for path, leaf in leaves.items()})


Placer = Callable[[str, Any, bool], Any]


def _on_default_device(path: str, value: Any, stacked: bool) -> Any:
    """A numpy leaf to the default device in one copy (`jnp.asarray` makes two)."""
    return value if isinstance(value, QuantizedTensor) else jax.device_put(value)


def _check_values(array: np.ndarray, name: str, source: str) -> None:
    """ValueError naming the tensor unless it holds floats, all finite (one pass over it)."""
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(
            f"{source}: tensor {name!r} has dtype {array.dtype}, but a float weight is expected; "
            "jpeft reads float checkpoints and bitsandbytes 4-bit ones (with their "
            "quantization_config in config.json)"
        )
    if not np.isfinite(array).all():
        raise ValueError(
            f"{source}: tensor {name!r} holds NaN or inf values; the checkpoint is damaged "
            "(or was saved after a diverged training run)"
        )


def _layer_shape(shapes: Params, path: tuple[str, ...]) -> tuple[int, ...]:
    """One layer's shape of the param at `path` (the whole shape outside the stacked layers)."""
    shape = tuple(_get(shapes, path))
    return shape[1:] if path[:2] == ("model", "layers") else shape


def _stack_quantized(
    layers: dict[int | None, QuantizedTensor], source: str, path: tuple[str, ...]
) -> QuantizedTensor:
    """One quantized weight, or the layers of a stacked one in order."""
    if None in layers:
        return layers[None]
    try:
        return stack([layers[i] for i in range(len(layers))])
    except ValueError as err:
        raise ValueError(
            f"{source}: the layers of {'.'.join(path)} are quantized differently: {err}"
        ) from None


def default_dtype(dtype: Any, quantized: bool) -> Any:
    if dtype is not None:
        return dtype
    return default_compute_dtype() if quantized else jnp.float32


def _ignorable(config: ModelConfig, name: str) -> bool:
    """Checkpoint tensors that are deliberately not loaded (tied head, cached RoPE buffers)."""
    return (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith(
        "rotary_emb.inv_freq"
    )


def _get(tree: Params, path: tuple[str, ...]) -> np.ndarray:
    """The leaf of nested dict `tree` at key `path`."""
    for key in path:
        tree = tree[key]
    return tree
