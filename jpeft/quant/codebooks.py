"""The value tables of bitsandbytes' 4-bit formats and of its 8-bit map for double quantization.

Every table is a float32 numpy array holding the same bits as bitsandbytes 0.50 on CPU:
- `NF4` [16], sorted: the QLoRA normal-float code, quantiles of N(0, 1) scaled to [-1, 1].
- `FP4` [16], in bit-pattern order: bit 3 is the sign, bits 0-2 pick a magnitude; the magnitudes
  of the 3-bit patterns are 0, 0.0625, 8, 12, 4, 6, 2, 3, divided by 12. Code 8 holds +0.0, as
  bitsandbytes' saved `quant_map` does (its C dequantization kernel returns -0.0 for it).
- `dynamic_map()` [256], sorted: the signed 8-bit dynamic code (Dettmers 2015, "8-Bit
  Approximations for Parallelism in Deep Learning") that bitsandbytes uses for the absmax values
  when double quantizing. It is rebuilt here with torch's CPU rounding of `linspace`.
"""

from __future__ import annotations

import functools

import numpy as np

NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

FP4 = np.array(
    [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32
) / np.float32(12.0)

CODES = {"nf4": NF4, "fp4": FP4}

DYNAMIC_LEVELS = 65536


@functools.cache
def bucket_bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints between neighbouring code values [15], and the sort order of the code [16].

    bitsandbytes' CPU quantizer sends x to sorted bucket `sum(bounds < x)` (a value on a midpoint
    goes to the lower code), then to code `order[bucket]`. For FP4 the two zeros sort as code 0
    then code 8, so a bound sits at 0.0: x = 0 and small negatives get code 0, small positives
    code 8.
    """
    code = CODES[quant_type]
    order = np.argsort(code, kind="stable")
    ordered = code[order]
    bounds = (ordered[:-1] + ordered[1:]) / np.float32(2.0)
    return bounds.astype(np.float32), order.astype(np.uint8)


def _torch_linspace(start: float, stop: float, num: int) -> np.ndarray:
    """`torch.linspace(start, stop, num, dtype=float32)` on CPU: each point is one fused
    multiply-add from the nearer end, so it is rounded once."""
    first, last = np.float32(start), np.float32(stop)
    step = np.float64((last - first) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    from_first = np.float64(first) + step * i
    from_last = np.float64(last) - step * (num - 1 - i)
    return np.where(i < num // 2, from_first, from_last).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True)` [256]: for exponents e = 0..6, the midpoints
    of 2**e + 1 evenly spaced points on [0.1, 1], times 10**(e - 6), both signs; plus 0 and 1."""
    values = [np.zeros(1, np.float32), np.ones(1, np.float32)]
    for e in range(7):
        points = _torch_linspace(0.1, 1.0, 2**e + 1)
        means = (points[:-1] + points[1:]) / np.float32(2.0)
        scaled = np.float32(10.0 ** (e - 6)) * means
        values += [scaled, -scaled]
    return np.sort(np.concatenate(values)).astype(np.float32)


def _level(z: np.ndarray) -> np.ndarray:
    """The level bitsandbytes' CPU blockwise quantizer gives z in [-1, 1]: z + 1 scaled onto
    0..65535 in float32 steps and rounded half up."""
    scaled = (z.astype(np.float32) + np.float32(1.0)) * np.float32((DYNAMIC_LEVELS - 1) / 2)
    return np.floor(scaled.astype(np.float32) + np.float32(0.5)).astype(np.int64)


def _ordered_bits(z: np.ndarray) -> np.ndarray:
    bits = z.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _float_from_ordered(o: np.ndarray) -> np.ndarray:
    bits = np.where(o < 0, (-o) | 0x80000000, o).astype(np.uint32)
    return bits.view(np.float32)


@functools.cache
def dynamic_thresholds() -> np.ndarray:
    """float32 [255], non-decreasing: entry k - 1 is the least z in [-1, 1] that bitsandbytes' CPU
    blockwise quantizer maps to code k or above, so `code = sum(thresholds <= z)`.

    That quantizer does not search the code: it rounds z to one of 65536 evenly spaced levels
    (see `_level`) and looks up the code value nearest to the level. Near 0 the code is finer than
    the levels, so codes 124..130 are never produced. The thresholds are found here by bisection
    over the float32 numbers.
    """
    code = dynamic_map().astype(np.float64)
    centers = np.arange(DYNAMIC_LEVELS) / ((DYNAMIC_LEVELS - 1) / 2) - 1.0
    above = np.clip(np.searchsorted(code, centers), 1, code.size - 1)
    nearest = above - (centers - code[above - 1] <= code[above] - centers)
    first_level = np.searchsorted(nearest, np.arange(1, code.size), side="left")
    lo = np.full(first_level.shape, _ordered_bits(np.float32(-1.0)), np.int64)
    hi = np.full(first_level.shape, _ordered_bits(np.float32(1.0)), np.int64)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        reached = _level(_float_from_ordered(mid)) >= first_level
        hi = np.where(reached, mid, hi)
        lo = np.where(reached, lo, mid)
    return _float_from_ordered(hi)
