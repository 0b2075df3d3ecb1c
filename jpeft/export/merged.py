"""The weights an export writes: the adapter merged into the base, in the per-layer HF view."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jpeft import tree as jtree
from jpeft.adapter import Adapter
from jpeft.injection import merge
from jpeft.method import method_for
from jpeft.quant import QuantizedTensor
from jpeft.quant.params import dequantize_params

EXPORT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def merged_params(
    params: Mapping[str, Any], adapter: Adapter | None = None, *, keep_4bit: bool = False
) -> dict[str, Any]:
    """`params` with `adapter` merged in (PEFT's `merge_and_unload`), as a float tree; with
    `keep_4bit`, the 4-bit weights stay 4-bit (the merged ones quantized again, see
    `jpeft.merge`). ValueError for an adapter no weights can hold (prompt learning)."""
    if adapter is None:
        return dict(params) if keep_4bit else dequantize_params(params)
    if method_for(adapter.config).is_prompt_learning:
        raise ValueError(
            f"a {adapter.config.peft_type} adapter cannot be exported merged: it adds virtual "
            "tokens or an attention prefix, not a weight change, so no checkpoint's weights can "
            "hold it; ship the adapter folder itself (PEFT format, jpeft.save_pretrained), which "
            "PeftModel.from_pretrained loads on the base model"
        )
    return merge(params, adapter, requantize=keep_4bit)


def is_tied(params: Mapping[str, Any]) -> bool:
    """Whether the head reads the embedding table (no `lm_head` of its own)."""
    return jtree.tied_head_source(params, jtree.TIED_HEAD) != jtree.TIED_HEAD


def iter_hf_tensors(params: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Yield `(hf_name, leaf)` for every tensor a checkpoint of `params` holds, layer by layer
    (`model.layers.3.mlp.up_proj.weight`), in param-tree order; a tied head is not repeated.
    Leaves are arrays or (with 4-bit weights) one layer's `QuantizedTensor`."""
    for name in jtree.hf_leaf_names(params):
        if name == jtree.TIED_HEAD and is_tied(params):
            continue
        tree_path, layer = jtree.hf_param_path(params, name)
        yield name, jtree.layer_of(jtree.get_path(params, tree_path), layer)


def to_numpy(leaf: Any, dtype: np.dtype) -> np.ndarray:
    """A float leaf as a host array of `dtype`."""
    return np.asarray(jax.device_get(leaf)).astype(dtype)


def float_dtype_name(params: Mapping[str, Any]) -> str:
    """The dtype name of the float weights of `params` (4-bit ones count as their own dtype)."""
    for name, leaf in iter_hf_tensors(params):
        if name.endswith(".weight"):
            dtype = leaf.dtype if isinstance(leaf, QuantizedTensor) else np.dtype(leaf.dtype).name
            return str(dtype)
    raise ValueError("params hold no weights")


def export_dtype(name: str | None, params: Mapping[str, Any]) -> np.dtype:
    """The numpy dtype of export dtype `name` (None: the params' own float dtype)."""
    name = name or float_dtype_name(params)
    if name not in EXPORT_DTYPES:
        raise ValueError(f"dtype {name!r} cannot be exported; choose one of {list(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[name]
