"""llama.cpp GGUF files -> `(LlamaForCausalLM, params)`.

The file is memory-mapped with `gguf.GGUFReader`. Each tensor is dequantized to a float32 numpy
array on its own (`gguf.quants.dequantize`), renamed to its Hugging Face name, un-permuted where
llama.cpp's converter permuted it, and streamed into `place_tensors`, so besides the parameter
buffers at most one float32 tensor exists at a time. The HF-style config dict is rebuilt from the
`{arch}.*` metadata and goes through `config_from_hf` as a `config.json` would.

Dimension order: GGUF lists a tensor's dimensions fastest-varying first (`ne0` = columns); the
reader's arrays are numpy row-major with those dimensions reversed, so a 2-D weight dequantizes to
HF's `[out_features, in_features]`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from jpeft.gguf_file import REQUIRED, metadata, open_reader
from jpeft.models.hf_loading import Placer, config_from_hf, place_tensors
from jpeft.models.llama import LlamaForCausalLM, ModelConfig, Params
from jpeft.models.rope import RopeScaling, inverse_frequencies
from jpeft.quant import QuantConfig

_T = GGMLQuantizationType
# GGUF `general.architecture` -> HF `model_type`.
SUPPORTED_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
# Gemma's llama.cpp converter stores every RMSNorm weight w as 1 + w (its norm scales by the
# stored weight); the loader subtracts it, exporters add it.
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# Gemma 2/3 layers have four norms; llama.cpp names the pre-MLP one ffn_norm, as Llama's
# post_attention_layernorm (which Gemma 2/3 put on the attention output).
_SANDWICH_NORM_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
SUPPORTED_TENSOR_TYPES = frozenset(
    (_T.F32, _T.F16, _T.BF16, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0)
    + (_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K)
)
# Architectures whose llama.cpp converter interleaves the rotary halves of the q/k rows.
PERMUTED_QK_ARCHITECTURES = ("llama",)
ROPE_FREQS = "rope_freqs.weight"
_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_LEVEL_PATTERN = re.compile(r"(\w+)\.(weight|bias)")
# The inverse maps, HF -> GGUF (for exports).
_GGUF_TOP_LEVEL_NAMES = {hf: name for name, hf in _TOP_LEVEL_NAMES.items()}
_GGUF_LAYER_NAMES = {hf: name for name, hf in _LAYER_NAMES.items()}
_HF_LAYER_PATTERN = re.compile(r"model\.layers\.(\d+)\.(\w+(?:\.\w+)?)\.(weight|bias)")
_HF_TOP_LEVEL_PATTERN = re.compile(r"((?:model\.)?\w+)\.(weight|bias)")
# Llama 3.1 rope scaling, which llama.cpp bakes into `rope_freqs.weight`; only `factor` varies
# between the released Llama 3.x models.
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LLAMA3_ORIGINAL_CONTEXT = 8192


def load_gguf(
    path: str | Path,
    dtype: Any = jnp.float32,
    quantization: QuantConfig | None = None,
    place: Placer | None = None,
) -> tuple[LlamaForCausalLM, Params]:
    """Load a llama.cpp GGUF file (llama, qwen2 or qwen3) as `(model, params)` in `dtype`.

    Quantized tensors are dequantized to float32, then cast to `dtype`; with `quantization`, the
    linear weights it covers are then quantized to bitsandbytes' 4-bit format, one at a time
    (see `hf_loading.place_tensors`, also for `place`). Raises FileNotFoundError
    for a missing file, and ValueError naming the file for one it cannot load (not GGUF, or an
    unsupported architecture, tensor type, tensor or rope scaling).
    """
    source = str(path)
    reader = open_gguf(path)
    model = LlamaForCausalLM(config_from_hf(hf_config_from_gguf(reader, source)))
    arch = metadata(reader, "general.architecture")
    tensors = iter_gguf_tensors(reader, model.config, arch, source)
    return model, place_tensors(model.config, tensors, dtype, source, quantization, place)


def open_gguf(path: str | Path) -> GGUFReader:
    """A memory-mapped reader of GGUF file `path`, checked for architecture and tensor types."""
    source = str(path)
    reader = open_reader(path)
    arch = metadata(reader, "general.architecture", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source!r} has general.architecture={arch!r}; supported: "
            f"{tuple(SUPPORTED_ARCHITECTURES)}"
        )
    unsupported = [
        (t.name, t.tensor_type.name)
        for t in reader.tensors
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES
    ]
    if unsupported:
        raise ValueError(
            f"{source!r} has {len(unsupported)} tensor(s) of an unsupported type, e.g. "
            f"{unsupported[:3]}; supported: {sorted(t.name for t in SUPPORTED_TENSOR_TYPES)}"
        )
    return reader


def hf_config_from_gguf(reader: GGUFReader, source: str) -> dict[str, Any]:
    """The HF config dict (as in `config.json`) that the metadata and tensors of `reader` imply."""
    arch = metadata(reader, "general.architecture", source=source)

    def key(name: str, default: Any = REQUIRED) -> Any:
        return metadata(reader, f"{arch}.{name}", default, source)

    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(f"GGUF file {source!r} has no token_embd.weight tensor")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise ValueError(f"GGUF file {source!r} has per-layer head counts; not supported")
    head_dim = key("attention.key_length", hidden // heads)
    rotary_dim = key("rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(
            f"GGUF file {source!r} has {arch}.rope.dimension_count={rotary_dim} but head_dim="
            f"{head_dim}; partial rotary embeddings are not supported"
        )
    theta = float(key("rope.freq_base", 10000.0))
    config = {
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "vocab_size": _hf_shape(reader, "token_embd.weight")[0],
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "rope_parameters": {"rope_theta": theta, **_rope_scaling(reader, key, head_dim, source)},
    }
    if arch in GEMMA_ARCHITECTURES:
        config.update(_gemma_config(arch, key, config, source))
    return config


def _gemma_config(
    arch: str, key: Callable[..., Any], config: dict[str, Any], source: str
) -> dict[str, Any]:
    """The Gemma config.json keys a GGUF file implies, with llama.cpp's defaults for what its
    converter does not write (`src/llama-model.cpp`): the attention scale is head_dim's but for
    the 27B models (46 / 62 layers: hidden / heads), Gemma 2 slides every other layer, Gemma 3
    five of six with RoPE base 10000 on the sliding layers."""
    extra: dict[str, Any] = {"hidden_activation": "gelu_pytorch_tanh"}
    if arch == "gemma":
        return extra
    big = config["num_hidden_layers"] == (46 if arch == "gemma2" else 62)
    scalar = config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"]
    window = key("attention.sliding_window", None)
    if not window:
        raise ValueError(
            f"GGUF file {source!r} has no {arch}.attention.sliding_window; jpeft runs {arch} "
            "with its sliding-window layers, whose window the file must give"
        )
    extra.update(
        query_pre_attn_scalar=scalar,
        sliding_window=window,
        final_logit_softcapping=key("final_logit_softcapping", None),
    )
    if arch == "gemma2":
        extra["attn_logit_softcapping"] = key("attn_logit_softcapping", None)
        return extra
    rope = config.pop("rope_parameters")
    extra.update(
        sliding_window_pattern=key("attention.sliding_window_pattern", 6),
        rope_theta=rope.pop("rope_theta"),
        rope_scaling=rope or None,
        rope_local_base_freq=float(key("rope.freq_base_swa", 10000.0)),
    )
    return extra


def _hf_shape(reader: GGUFReader, name: str) -> tuple[int, ...]:
    """The HF (row-major) shape of tensor `name`: GGUF's dimension list reversed."""
    tensor = next(t for t in reader.tensors if t.name == name)
    return tuple(int(d) for d in reversed(tensor.shape))


def _rope_scaling(
    reader: GGUFReader, key: Callable[..., Any], head_dim: int, source: str
) -> dict[str, Any]:
    """The `rope_parameters` entries besides `rope_theta`, from `{arch}.rope.scaling.*` metadata
    (linear) or a `rope_freqs.weight` tensor (Llama 3.1 scaling, per-frequency divisors)."""
    kind = key("rope.scaling.type", "none")
    rope_freqs = [t for t in reader.tensors if t.name == ROPE_FREQS]
    if kind not in ("none", "linear") or (kind == "linear" and rope_freqs):
        raise ValueError(
            f"GGUF file {source!r} has rope scaling {kind!r}"
            f"{' and ' + ROPE_FREQS if rope_freqs else ''}; supported: linear, or {ROPE_FREQS} "
            "holding Llama 3.1 scaling"
        )
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if not rope_freqs:
        return {}
    factors = dequantize(rope_freqs[0].data, rope_freqs[0].tensor_type)
    return _llama3_rope(factors, head_dim, float(key("rope.freq_base", 10000.0)), source)


def _llama3_rope(factors: np.ndarray, head_dim: int, theta: float, source: str) -> dict[str, Any]:
    """Llama 3.1 rope parameters matching llama.cpp's per-frequency divisors `factors`
    [head_dim // 2]; ValueError when no such parameters reproduce them."""
    if np.all(factors == 1.0):
        return {}
    rope = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        **_LLAMA3_ROPE,
        "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT,
    }
    scaling = RopeScaling(**rope)
    expected = inverse_frequencies(head_dim, theta, None) / inverse_frequencies(
        head_dim, theta, scaling
    )
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
        raise ValueError(
            f"GGUF file {source!r}: {ROPE_FREQS} is not Llama 3.1 rope scaling with {rope}; "
            "other per-frequency rope factors are not supported"
        )
    return rope


def _layer_names(arch: str) -> dict[str, str]:
    """GGUF layer module name -> HF name, for GGUF architecture `arch`."""
    if arch in ("gemma2", "gemma3"):
        return {**_LAYER_NAMES, **_SANDWICH_NORM_NAMES}
    return _LAYER_NAMES


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF name of GGUF tensor `gguf_name` of an `arch` model, or None if it has none.

    E.g. `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`,
    `token_embd.weight` -> `model.embed_tokens.weight`, `output.weight` -> `lm_head.weight`.
    """
    if match := _LAYER_PATTERN.fullmatch(gguf_name):
        layer, module, leaf = match.groups()
        names = _layer_names(arch)
        if module in names:
            return f"model.layers.{layer}.{names[module]}.{leaf}"
    elif match := _TOP_LEVEL_PATTERN.fullmatch(gguf_name):
        module, leaf = match.groups()
        if module in _TOP_LEVEL_NAMES:
            return f"{_TOP_LEVEL_NAMES[module]}.{leaf}"
    return None


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of HF tensor `hf_name` (the inverse of `hf_tensor_name`), or None if it has
    none. E.g. `model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`."""
    if match := _HF_LAYER_PATTERN.fullmatch(hf_name):
        layer, module, leaf = match.groups()
        if module in _GGUF_LAYER_NAMES:
            return f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{leaf}"
    elif match := _HF_TOP_LEVEL_PATTERN.fullmatch(hf_name):
        module, leaf = match.groups()
        if module in _GGUF_TOP_LEVEL_NAMES:
            return f"{_GGUF_TOP_LEVEL_NAMES[module]}.{leaf}"
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's rotary permutation of a q/k weight `[n_head * head_dim, ...]` or
    bias (same shape out): the inverse of `unpermute_rows`."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q/k weight `[n_head * head_dim, in]` or bias
    `[n_head * head_dim]` (same shape out).

    llama.cpp's converter interleaves each head's two rotary halves (HF rows `0, d/2, 1, d/2 + 1,
    ...` of a head with `d = head_dim`) for its GPT-J-style rope; HF keeps them contiguous.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rotary_heads(hf_name: str, config: ModelConfig) -> int | None:
    """The head count by which llama.cpp's converter permutes the rows of HF tensor `hf_name`
    (for the architectures in PERMUTED_QK_ARCHITECTURES): `num_attention_heads` for q_proj,
    `num_key_value_heads` for k_proj (weight or bias); None for the other tensors."""
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    return heads.get(hf_name.split(".")[-2])


def iter_gguf_tensors(
    reader: GGUFReader, config: ModelConfig, arch: str, source: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_name, float32 array)` per tensor of an `arch` file, dequantized one at a time;
    q/k rows un-permuted where llama.cpp permutes them (see `rotary_heads`), Gemma's norms back
    from 1 + w."""
    permuted = arch in PERMUTED_QK_ARCHITECTURES
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:  # already folded into the config's rope scaling
            continue
        name = hf_tensor_name(tensor.name, arch)
        if name is None:
            raise ValueError(
                f"GGUF file {source!r} has tensor {tensor.name!r}, which a "
                f"{config.model_type} model has no place for"
            )
        array = dequantize(tensor.data, tensor.tensor_type)
        n_head = rotary_heads(name, config)
        # A wrong row count is left for `place_tensors` to report as a shape mismatch.
        if permuted and n_head and array.shape[0] == n_head * config.head_dim:
            array = unpermute_rows(array, n_head)
        if arch in GEMMA_ARCHITECTURES and name.endswith("norm.weight"):
            array = array - 1.0
        yield name, array
