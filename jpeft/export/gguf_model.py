"""A merged model as one GGUF file that llama.cpp loads, as its `convert_hf_to_gguf.py` writes
Llama, Mistral (as llama), Qwen2 and Qwen3 models.

- Tensors get llama.cpp's names (`blk.3.attn_q.weight`); for the llama architecture the q/k rows
  are permuted back to llama.cpp's interleaved rotary layout. A tied head writes no
  `output.weight`. Llama 3.1 rope scaling becomes the `rope_freqs.weight` divisors.
- Types: the 2-D weights in `outtype`; 1-D tensors and norms stay F32, and a weight whose row
  length the type's block does not divide falls back to F16, as in the converter.
- Metadata: `general.*` (a GGUF base's descriptive keys are kept), the `{arch}.*`
  hyperparameters, and the tokenizer (`gguf_vocab`).

Tensors are quantized and written one at a time (the GGUF header, which lists every tensor's type
and size, is planned first), so no second full copy of the model is held in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    quant_shape_to_byte_shape,
)
from gguf.quants import quantize

from jpeft import tree as jtree
from jpeft.adapter import Adapter
from jpeft.export.gguf_vocab import add_tokenizer, copy_fields
from jpeft.export.hf_checkpoint import hf_config
from jpeft.export.merged import is_tied, iter_hf_tensors, merged_params, to_numpy
from jpeft.export.staging import staged_file
from jpeft.gguf_file import is_gguf_path
from jpeft.models.gguf_loading import (
    PERMUTED_QK_ARCHITECTURES,
    ROPE_FREQS,
    gguf_tensor_name,
    open_gguf,
    permute_rows,
    rotary_heads,
)
from jpeft.models.hf_loading import config_from_hf
from jpeft.models.llama import SLIDING_ATTENTION, ModelConfig, param_shapes
from jpeft.models.rope import inverse_frequencies

T = GGMLQuantizationType
# outtype -> (the type of the 2-D weights, `general.file_type`): the types `gguf` can quantize to
# that jpeft's GGUF loader reads back.
OUTTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (T.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
# HF model_type -> GGUF `general.architecture` (llama.cpp's converter writes Mistral as llama).
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# `general.*` keys an export writes itself rather than copying them from a GGUF base.
_OWN_GENERAL_KEYS = frozenset(
    f"general.{key}"
    for key in ("architecture", "type", "name", "file_type", "quantization_version", "alignment")
)


@dataclasses.dataclass(frozen=True)
class GgufTensor:
    """A tensor to write: GGUF name, shape (row-major, as numpy), type, and its float32 data."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    data: Callable[[], np.ndarray]


def save_merged_gguf(
    out_file: str | os.PathLike,
    base: str | os.PathLike,
    params: Mapping[str, Any],
    adapter: Adapter | None = None,
    *,
    outtype: str = "f16",
    tokenizer: bool = True,
) -> Path:
    """Write `params` (loaded from `base`, a HF checkpoint folder or a GGUF file) with `adapter`
    merged in (dequantized) as GGUF file `out_file` for llama.cpp; returns its path. Written whole
    or not at all; `out_file` must be new.

    outtype: the type of the 2-D weights, one of OUTTYPES.
    tokenizer: write the base's tokenizer and chat template (a GGUF base's are copied); False
        writes `tokenizer.ggml.model = "none"`, for a base without a tokenizer.
    """
    qtype, file_type = outtype_types(outtype)
    merged = merged_params(params, adapter)
    hf, config = base_config(base, is_tied(merged))
    check_fits(merged, config, base)
    arch = gguf_architecture(config)
    tensors = _rope_tensors(config) + hf_tensors(merged, config, arch, qtype)

    def metadata(writer: GGUFWriter) -> None:
        writer.add_type(GGUFType.MODEL)
        _add_general(writer, out_file, base)
        add_hparams(writer, config)
        writer.add_file_type(file_type)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        if tokenizer:
            add_tokenizer(writer, base, config.vocab_size, hf)
        else:
            writer.add_tokenizer_model("none")

    return write_gguf(out_file, arch, metadata, tensors)


def outtype_types(outtype: str) -> tuple[GGMLQuantizationType, LlamaFileType]:
    """(weight type, file type) of `outtype`; ValueError listing the choices."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not supported; choose one of {list(OUTTYPES)}")
    return OUTTYPES[outtype]


def base_config(base: str | os.PathLike, tied: bool) -> tuple[dict[str, Any], ModelConfig]:
    """(HF config dict, ModelConfig) of checkpoint folder or GGUF file `base`."""
    hf = hf_config(base, "float32", tied)
    return hf, config_from_hf(hf)


def check_fits(params: Mapping[str, Any], config: ModelConfig, base: Any) -> None:
    """ValueError when a param's shape differs from what `base`'s config gives (wrong base)."""
    expected = jtree.flatten(param_shapes(config))
    actual = {path: tuple(np.shape(leaf)) for path, leaf in jtree.flatten(params).items()}
    wrong = [p for p in sorted(expected.keys() | actual.keys()) if expected.get(p) != actual.get(p)]
    if wrong:
        path = wrong[0]
        raise ValueError(
            f"the params do not fit the config of base {base}: {path} has shape "
            f"{actual.get(path, 'none')} but the config gives {expected.get(path, 'none')} "
            f"({len(wrong)} mismatch(es)); pass the base the params were loaded from"
        )


def gguf_architecture(config: ModelConfig) -> str:
    """The GGUF architecture llama.cpp runs `config` as; ValueError for what it cannot run, a
    warning for a sliding window it ignores (as it does for converted Mistral models)."""
    if config.model_type not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"jpeft writes {sorted(GGUF_ARCHITECTURES)} models as GGUF, not {config.model_type}; "
            "export a Hugging Face checkpoint (--format hf) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    if config.hidden_act != "silu":
        raise ValueError(
            f"hidden_act={config.hidden_act!r}: llama.cpp's {config.model_type} architecture "
            "computes silu; this model cannot be exported to GGUF"
        )
    if SLIDING_ATTENTION in config.layer_types:
        warnings.warn(
            f"sliding_window={config.sliding_window} is not written: llama.cpp runs "
            f"{config.model_type} with full attention, so outputs past "
            f"{config.sliding_window} tokens differ from the original model's",
            stacklevel=3,
        )
    return GGUF_ARCHITECTURES[config.model_type]


def tensor_type(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType):
    """The type GGUF tensor `name` is written in: F32 for 1-D tensors and norms, F16 where the
    block of `qtype` does not divide the rows, else `qtype`."""
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return T.F32
    block_size, _ = GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block_size == 0 else T.F16


def hf_tensors(
    params: Mapping[str, Any], config: ModelConfig, arch: str, qtype: GGMLQuantizationType
) -> list[GgufTensor]:
    """Every tensor of `params` under its GGUF name, q/k rows permuted for `arch` llama. A
    tensor's data is taken from `params` only when it is written (a layer's slice of a stacked
    leaf is a copy)."""
    tensors = []
    for hf_name, leaf in iter_hf_tensors(params):
        name = gguf_tensor_name(hf_name)
        if name is None:
            raise ValueError(f"{hf_name} has no GGUF tensor name; it cannot be exported to GGUF")
        heads = rotary_heads(hf_name, config) if arch in PERMUTED_QK_ARCHITECTURES else None
        shape = tuple(np.shape(leaf))
        data = functools.partial(_hf_array, params, hf_name, heads)
        tensors.append(GgufTensor(name, shape, tensor_type(name, shape, qtype), data))
    return tensors


def _hf_array(params: Mapping[str, Any], hf_name: str, heads: int | None) -> np.ndarray:
    """HF tensor `hf_name` of `params` as a host array (see `host_array`)."""
    tree_path, layer = jtree.hf_param_path(params, hf_name)
    return host_array(jtree.layer_of(jtree.get_path(params, tree_path), layer), heads)


def host_array(leaf: Any, heads: int | None) -> np.ndarray:
    """`leaf` as a float32 host array, its rows permuted for `heads` rotary heads if given."""
    array = to_numpy(leaf, np.dtype(np.float32))
    return array if heads is None else permute_rows(array, heads)


def _rope_tensors(config: ModelConfig) -> list[GgufTensor]:
    """`rope_freqs.weight` [head_dim // 2] for Llama 3.1 rope scaling: llama.cpp divides each
    rotary frequency by its entry (the same divisors jpeft's loader reads back)."""
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type != "llama3":
        return []
    head_dim, theta = config.head_dim, config.rope_theta
    factors = inverse_frequencies(head_dim, theta, None) / inverse_frequencies(
        head_dim, theta, scaling
    )
    factors = factors.astype(np.float32)
    return [GgufTensor(ROPE_FREQS, factors.shape, T.F32, lambda: factors)]


def _add_general(writer: GGUFWriter, out_file: Any, base: Any) -> None:
    """`general.name` (the output file's name) and a GGUF base's other descriptive keys."""
    if is_gguf_path(base):
        copy_fields(writer, open_gguf(base), _is_descriptive)
    writer.add_name(Path(out_file).stem)


def _is_descriptive(key: str) -> bool:
    """Whether a GGUF base's metadata `key` is copied: the `general.*` keys (license, tags, base
    models, ...) an export does not write itself."""
    return key.startswith("general.") and key not in _OWN_GENERAL_KEYS


def add_hparams(writer: GGUFWriter, config: ModelConfig) -> None:
    """The `{arch}.*` hyperparameters llama.cpp reads (and jpeft's GGUF loader)."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)


def write_gguf(
    out_file: str | os.PathLike,
    arch: str,
    metadata: Callable[[GGUFWriter], None],
    tensors: list[GgufTensor],
) -> Path:
    """Write GGUF file `out_file` (staged: whole or not at all): `metadata(writer)` adds the
    keys, then `tensors` are quantized and written one at a time; returns its absolute path."""
    with staged_file(out_file, "GGUF file") as partial:
        writer = GGUFWriter(partial, arch)
        try:
            metadata(writer)
            for t in tensors:
                nbytes = int(np.prod(quant_shape_to_byte_shape(t.shape, t.qtype)))
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                writer.write_tensor_data(quantize(t.data(), t.qtype))
        finally:
            writer.close()
    return Path(os.path.abspath(out_file))
