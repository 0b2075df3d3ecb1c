"""Reading a `.safetensors` file tensor by tensor, each into its own array, and writing one.

The format: an unsigned little-endian 64-bit header length N, then N bytes of JSON mapping each
tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that
follows the header; an optional "__metadata__" entry holds strings), then the data. Reading with
plain file reads rather than a memory map keeps resident memory at the tensors still alive:
pages of a mapped file count towards the process's resident set until the map is closed.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 2**20


def header(path: str | Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} in file order (no metadata entry)."""
    return _read_header(path)[0]


def read_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(name, array)` for each tensor of safetensors file `path`, in file order."""
    entries, data_start = _read_header(path)
    with open(path, "rb") as f:
        for name, entry in entries.items():
            begin, end = entry["data_offsets"]
            dtype = np.dtype(DTYPES[entry["dtype"]])
            count = math.prod(entry["shape"])
            if end - begin != count * dtype.itemsize:
                raise ValueError(
                    f"{path}: tensor {name!r} has {end - begin} bytes, but its dtype "
                    f"{entry['dtype']} and shape {entry['shape']} need {count * dtype.itemsize}"
                )
            f.seek(data_start + begin)
            raw = np.empty(end - begin, np.uint8)  # bytes first: bfloat16 has no buffer format
            if f.readinto(memoryview(raw)) != end - begin:
                raise ValueError(f"{path} ends inside tensor {name!r}: the file is truncated")
            yield name, raw.view(dtype).reshape(entry["shape"])


def _read_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], int]:
    with open(path, "rb") as f:
        prefix = f.read(8)
        size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < size <= _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (bad header length)")
        try:
            entries = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file: {err}") from None
    entries.pop("__metadata__", None)
    unknown = sorted({e["dtype"] for e in entries.values()} - set(DTYPES))
    if unknown:
        raise ValueError(f"{path} has tensors of dtype(s) {unknown}, which jpeft does not read")
    ordered = dict(sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]))
    return ordered, 8 + size


def write(
    path: str | Path, tensors: list[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
) -> int:
    """Write `(name, array)` pairs as safetensors file `path`, one array at a time (no copy of the
    whole file in memory); returns the bytes of tensor data written.

    The dtypes are those of `DTYPES` (bfloat16 as `ml_dtypes.bfloat16`). The header is padded
    with spaces to a multiple of 8 bytes, as the safetensors library pads it.
    """
    names = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, array in tensors:
        if array.dtype not in names:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors lacks")
        entries[name] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for _, array in tensors:
            f.write(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)
    return offset
