"""Checkpoints that transformers saved with a bitsandbytes 4-bit `quantization_config`.

Such a checkpoint keeps each quantized linear layer as the entries of `Linear4bit.state_dict()`
(`<module>.weight` holding the packed codes, `<module>.weight.absmax`, ... and the
`<module>.weight.quant_state.bitsandbytes__nf4` JSON; see `jpeft.quant.bnb_state`), and every
other tensor in floats. `combine_4bit_weights` turns each module's entries into one
`QuantizedTensor` for `hf_loading.place_tensors`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from jpeft.quant import QuantConfig, QuantizedTensor, from_bnb

STATE_MARKER = ".weight.quant_state.bitsandbytes__"


def saved_quantization(hf_config: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    """The checkpoint's bitsandbytes 4-bit `quantization_config`, or None for a float checkpoint.

    Raises ValueError for quantization jpeft cannot read (another method, 8-bit).
    """
    config = hf_config.get("quantization_config")
    if not config:
        return None
    method = config.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(
            f"{source}: quantization_config has quant_method={method!r}; jpeft reads float "
            'checkpoints (quantize="nf4" quantizes them while loading) and bitsandbytes 4-bit ones'
        )
    if config.get("load_in_8bit") or not config.get("load_in_4bit"):
        raise ValueError(
            f"{source} is a bitsandbytes 8-bit checkpoint (load_in_8bit); jpeft reads 4-bit "
            'ones (load_in_4bit); load the float model with quantize="nf4" instead'
        )
    return config


def check_request(saved: Mapping[str, Any], requested: QuantConfig | None, source: str) -> None:
    """Refuse a `quantize=` request that contradicts how the checkpoint is quantized."""
    if requested is None:
        return
    have = (saved.get("bnb_4bit_quant_type", "fp4"), bool(saved.get("bnb_4bit_use_double_quant")))
    want = (requested.quant_type, requested.double_quant)
    if have != want:
        raise ValueError(
            f"{source} is saved quantized as (quant_type, double_quant)={have}, but "
            f"{want} was requested; leave out quantize= to load it as saved"
        )


def quantized_modules(keys: Iterable[str]) -> set[str]:
    """The module names that have a 4-bit quant state among checkpoint `keys`."""
    return {key.split(STATE_MARKER)[0] for key in keys if STATE_MARKER in key}


def combine_4bit_weights(
    tensors: Iterable[tuple[str, np.ndarray]], keys: Iterable[str]
) -> Iterator[tuple[str, np.ndarray | QuantizedTensor]]:
    """Pass float tensors through; yield `(<module>.weight, QuantizedTensor)` for each 4-bit
    module once the stream is over (its entries are quantized-sized, so gathering them is cheap).
    """
    modules = quantized_modules(keys)
    entries: dict[str, dict[str, np.ndarray]] = {module: {} for module in modules}
    for name, array in tensors:
        module = _owning_module(name, modules)
        if module is None:
            yield name, array
        else:
            entries[module][name] = np.array(array)
    for module in sorted(modules):
        yield f"{module}.weight", from_bnb(entries[module], prefix=f"{module}.")


def _owning_module(name: str, modules: set[str]) -> str | None:
    """The 4-bit module whose state entry `name` is (`<module>.weight...`), or None."""
    cut = name.rfind(".weight")
    head, rest = name[:cut], name[cut + len(".weight") :]
    if cut > 0 and head in modules and (not rest or rest.startswith(".")):
        return head
    return None
