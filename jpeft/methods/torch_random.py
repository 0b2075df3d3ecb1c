"""torch's CPU random generator, reproduced in numpy: the draws PEFT makes and does not save.

`torch.Generator().manual_seed(seed)` is an mt19937 whose state the seed's low 32 bits set by the
standard `init_genrand`; every 32-bit output below is one of that stream's, in torch's order.
VeRA's shared projections (`kaiming_uniform`) and FourierFT's frequency positions
(`randperm_prefix`) come from it; both are tested against torch itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# torch's randperm_cpu uses 32-bit draws and a forward Fisher-Yates below this size only.
RANDPERM_32BIT_LIMIT = (2**32 - 1) // 20


def mt19937_state(seed: int) -> np.ndarray:
    """[624] uint32: the mt19937 state `torch.Generator().manual_seed(seed)` starts from (its low
    32 bits seed the standard `init_genrand`)."""
    state = [seed & 0xFFFFFFFF]
    for index in range(1, 624):
        previous = state[-1]
        state.append((1812433253 * (previous ^ (previous >> 30)) + index) & 0xFFFFFFFF)
    return np.asarray(state, np.uint32)


def generator(seed: int) -> np.random.RandomState:
    """A stream whose `randint(0, 2**32, size, dtype=np.uint32)` gives the 32-bit outputs of
    `torch.Generator().manual_seed(seed)`, in order."""
    stream = np.random.RandomState()
    stream.set_state(("MT19937", mt19937_state(seed), 624))
    return stream


def kaiming_uniform(seed: int, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """float32 arrays of `shapes` drawn one after another, as PEFT's `_kaiming_init` draws them
    from `torch.Generator().manual_seed(seed)` on the CPU: each float takes one 32-bit mt19937
    output, keeps its low 24 bits as u = bits / 2**24, and is `u * (to - from) + from` rounded
    once (torch's CPU kernel, built with FMA), for the bound sqrt(3) * sqrt(2) / sqrt(fan_in)."""
    stream = generator(seed)
    drawn = []
    for shape in shapes:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        low, high = np.float32(-bound), np.float32(bound)
        bits = stream.randint(0, 2**32, size=shape, dtype=np.uint32)
        unit = (bits & 0xFFFFFF).astype(np.float64) * 2.0**-24
        drawn.append((unit * np.float64(high - low) + np.float64(low)).astype(np.float32))
    return drawn


def randperm_prefix(size: int, seed: int, count: int) -> np.ndarray:
    """`torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count]` (CPU), as
    int64, for size < RANDPERM_32BIT_LIMIT.

    torch's randperm swaps r[i] with r[i + random() % (size - i)] for
    i = 0 .. size - 2. Entry i is final after step i, so only the first `count` draws are made and
    the swaps are tracked sparsely: O(count), not O(size).
    """
    if size >= RANDPERM_32BIT_LIMIT:
        raise ValueError(f"randperm_prefix covers size < {RANDPERM_32BIT_LIMIT}, got {size}")
    stream = generator(seed)
    count = min(count, size)
    steps = min(count, size - 1)
    draws = stream.randint(0, 2**32, size=steps, dtype=np.uint32).astype(np.uint64)
    offsets = draws % (size - np.arange(steps, dtype=np.uint64))
    moved: dict[int, int] = {}
    out = np.empty(count, np.int64)
    for i, offset in enumerate(offsets.tolist()):
        j = i + offset
        out[i] = moved.get(j, j)
        moved[j] = moved.get(i, i)
    if steps < count:  # the last entry of a full permutation: never swapped out again
        out[steps] = moved.get(steps, steps)
    return out
