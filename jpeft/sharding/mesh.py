"""The device mesh: axes `data`, `fsdp` and `model`, over every device of every host.

- `data`: pure data parallelism, params replicated;
- `fsdp`: the batch and the params both split; a layer's weights are all-gathered when it runs;
- `model`: tensor parallelism over attention heads and the MLP's intermediate dimension.

All axes are `AxisType.Auto`, so `with_sharding_constraint` and XLA's sharding propagation work
(explicit axes reject constraints that name them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jpeft.activations import BATCH_AXES  # ("data", "fsdp"): FSDP is data parallelism too

AXES = ("data", "fsdp", "model")


def make_mesh(
    data: int = 1, fsdp: int = -1, model: int = 1, *, devices: Sequence | None = None
) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: all devices of all processes).

    One size may be -1: it takes the devices the others leave. On several TPU slices the `data`
    axis must be a multiple of the slice count; it spans the slices (data-center network) and the
    other axes stay within a slice (chip interconnect).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape({"data": data, "fsdp": fsdp, "model": model}, len(devices))
    sizes = tuple(shape[a] for a in AXES)
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1:
        return _multi_slice_mesh(sizes, devices, len(slices))
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def resolve_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes with a -1 filled in; ValueError unless their product is `num_devices`."""
    unknown = [a for a in AXES if sizes.get(a, 1) == -1]
    if len(unknown) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {dict(sizes)}")
    shape = {a: int(sizes.get(a, 1)) for a in AXES}
    bad = {a: s for a, s in shape.items() if s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive (or one -1), got {bad}")
    known = int(np.prod([s for s in shape.values() if s != -1]))
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(sizes)}: the fixed axes take {known} devices, which does not divide "
                f"the {num_devices} devices; choose sizes whose product divides {num_devices}"
            )
        shape[unknown[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh {shape} covers {known} devices but there are {num_devices} "
            f"({jax.process_count()} process(es)); the product of the sizes must equal the "
            "device count, or set one size to -1"
        )
    return shape


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,fsdp=-1,model=1"` -> {"data": 2, "fsdp": -1, "model": 1} (unnamed axes are 1)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise ValueError(f"mesh {text!r}: expected AXIS=SIZE with AXIS in {AXES}, got {part!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh {text!r}: size of {name!r} is not an integer") from None
    return sizes


def _multi_slice_mesh(sizes: tuple[int, ...], devices: list, num_slices: int) -> Mesh:
    """A hybrid mesh: `data` split across the slices, everything else inside each slice."""
    from jax.experimental import mesh_utils

    data, fsdp, model = sizes
    if data % num_slices:
        raise ValueError(
            f"the devices span {num_slices} TPU slices: the data axis ({data}) must be a "
            "multiple of the slice count"
        )
    grid = mesh_utils.create_hybrid_device_mesh(
        (data // num_slices, fsdp, model), (num_slices, 1, 1), devices=devices
    )
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_size_multiple(mesh: Mesh) -> int:
    """The batch must be a multiple of this: the devices along `data` and `fsdp`."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
