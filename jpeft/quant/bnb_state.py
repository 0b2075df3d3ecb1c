"""A 4-bit weight as bitsandbytes' `Linear4bit.state_dict()` saves it, both ways.

Keys, relative to the module prefix (e.g. `model.layers.0.mlp.down_proj.`):
- `weight`: uint8 [(n + 1) // 2, 1], the packed codes (another storage dtype is a view of them);
- `weight.absmax`: float32 [blocks], or uint8 [blocks] with double quantization;
- `weight.quant_map`: float32 [16], the 4-bit code (bitsandbytes itself reads it from quant_type);
- `weight.nested_absmax`: float32 [ceil(blocks / 256)] and `weight.nested_quant_map`:
  float32 [256], only with double quantization;
- `weight.quant_state.bitsandbytes__nf4` (or `__fp4`): uint8 bytes of the JSON object
  {"quant_type", "blocksize", "dtype", "shape", and with double quantization "nested_blocksize",
  "nested_dtype", "nested_offset"}, written by `json.dumps` with its default separators.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft.quant import codebooks
from jpeft.quant.formats import FLOAT_DTYPES, QuantizedTensor, check_format

STATE_KEY = "weight.quant_state.bitsandbytes__"


def to_bnb(q: QuantizedTensor, prefix: str = "") -> dict[str, np.ndarray]:
    """The state-dict entries bitsandbytes' `Linear4bit` saves for this weight, byte for byte."""
    if q.stack_shape:
        raise ValueError(
            f"to_bnb takes one weight, got a stack of shape {q.stack_shape}; "
            "use jpeft.quant.unstack for the weights of a stack"
        )
    meta: dict[str, Any] = {
        "quant_type": q.quant_type,
        "blocksize": q.blocksize,
        "dtype": q.dtype,
        "shape": list(q.weight_shape),
    }
    state = {
        "weight": np.asarray(q.packed).reshape(-1, 1),
        "weight.absmax": np.asarray(q.absmax),
        "weight.quant_map": codebooks.CODES[q.quant_type].copy(),
    }
    if q.double_quant:
        state["weight.nested_absmax"] = np.asarray(q.nested_absmax)
        state["weight.nested_quant_map"] = np.asarray(q.nested_code)
        meta.update(
            nested_blocksize=q.nested_blocksize,
            nested_dtype="float32",
            nested_offset=float(np.asarray(q.offset)),
        )
    state[STATE_KEY + q.quant_type] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
    return {prefix + key: value for key, value in state.items()}


def from_bnb(state: Mapping[str, Any], prefix: str = "") -> QuantizedTensor:
    """Read one `Linear4bit` weight from bitsandbytes' state-dict entries under `prefix`.

    Values may be numpy arrays, jax arrays or CPU torch tensors.
    """
    meta = _read_meta(state, prefix)
    double_quant = "nested_offset" in meta
    required = ["weight", "weight.absmax", "weight.quant_map"]
    if double_quant:
        required += ["weight.nested_absmax", "weight.nested_quant_map"]
    missing = [prefix + key for key in required if prefix + key not in state]
    if missing:
        raise ValueError(f"bitsandbytes 4-bit state under {prefix!r} lacks {missing}")
    quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
    check_format(quant_type, blocksize)
    if meta["dtype"] not in FLOAT_DTYPES:
        raise ValueError(f"{prefix}weight: dtype {meta['dtype']!r} is not one of {FLOAT_DTYPES}")
    shape = tuple(int(d) for d in meta["shape"])
    packed = np.ascontiguousarray(np.asarray(state[prefix + "weight"])).view(np.uint8).reshape(-1)
    blocks = -(-math.prod(shape) // blocksize)
    _check_size(prefix + "weight", packed, (math.prod(shape) + 1) // 2)
    absmax = np.asarray(state[prefix + "weight.absmax"]).reshape(-1)
    _check_size(prefix + "weight.absmax", absmax, blocks)
    _check_dtype(prefix + "weight.absmax", absmax, np.uint8 if double_quant else np.float32)
    nested = {}
    if double_quant:
        nested_blocksize = int(meta["nested_blocksize"])
        nested_absmax = np.asarray(state[prefix + "weight.nested_absmax"]).reshape(-1)
        _check_size(prefix + "weight.nested_absmax", nested_absmax, -(-blocks // nested_blocksize))
        nested_code = np.asarray(state[prefix + "weight.nested_quant_map"]).reshape(-1)
        _check_size(prefix + "weight.nested_quant_map", nested_code, 256)
        nested = {
            "nested_absmax": jnp.asarray(nested_absmax, jnp.float32),
            "nested_code": jnp.asarray(nested_code, jnp.float32),
            "offset": jnp.float32(meta["nested_offset"]),
            "nested_blocksize": nested_blocksize,
        }
    return QuantizedTensor(
        packed=jnp.asarray(packed),
        absmax=jnp.asarray(absmax),
        quant_type=quant_type,
        blocksize=blocksize,
        weight_shape=shape,
        dtype=meta["dtype"],
        **nested,
    )


def _read_meta(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    keys = [prefix + STATE_KEY + quant_type for quant_type in codebooks.CODES]
    found = [key for key in keys if key in state]
    if len(found) != 1:
        raise ValueError(
            f"bitsandbytes 4-bit state under {prefix!r} needs exactly one of {keys}, "
            f"found {found or 'none'}"
        )
    meta = json.loads(bytes(np.asarray(state[found[0]]).astype(np.uint8)).decode("utf-8"))
    absent = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in meta]
    if absent:
        raise ValueError(f"{found[0]} lacks the fields {absent}")
    return meta


def _check_size(key: str, array: np.ndarray, expected: int) -> None:
    if array.size != expected:
        raise ValueError(f"{key} has {array.size} elements, the quant_state implies {expected}")


def _check_dtype(key: str, array: np.ndarray, expected: type) -> None:
    if array.dtype != expected:
        raise ValueError(f"{key} is {array.dtype}, expected {np.dtype(expected).name}")
