"""Quantizing a model's param tree: which weights, in which format, and back to floats.

As bitsandbytes does through transformers, every linear layer's weight is quantized except the
output head (`lm_head`, and any module named in `skip_modules`); embeddings, norms and biases
stay in floats. A stacked weight [L, out, in] is quantized layer by layer, each layer exactly as
bitsandbytes would quantize that `nn.Linear`, and the results are stacked (`formats.stack`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from jpeft import tree as jtree
from jpeft.quant.formats import QuantizedTensor, check_format, dequantize, quantize, stack

DEFAULT_SKIP_MODULES = ("lm_head",)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model: bitsandbytes' `BitsAndBytesConfig` 4-bit fields, in short.

    quant_type: "nf4" or "fp4" (`bnb_4bit_quant_type`). blocksize: elements per absmax block
    (64 in bitsandbytes). double_quant: quantize the absmax values too
    (`bnb_4bit_use_double_quant`). skip_modules: module names (last path component or a
    dotted suffix) left unquantized (`llm_int8_skip_modules`; default: the output head).
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES

    def __post_init__(self) -> None:
        check_format(self.quant_type, self.blocksize)
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))

    def quantizes(self, module_path: str, layer_shape: tuple[int, ...]) -> bool:
        """Whether the weight of `module_path` (one layer's shape `layer_shape`) is quantized:
        a 2-D linear weight, not an embedding table, not a skipped module."""
        name = module_path.split(".")[-1]
        if len(layer_shape) != 2 or name in jtree.EMBEDDING_NAMES:
            return False
        return not any(
            module_path == skip or module_path.endswith("." + skip) or name == skip
            for skip in self.skip_modules
        )

    def quantize(self, weight: Any, name: str = "weight") -> QuantizedTensor:
        """One weight [out, in] (a numpy or jax array), quantized in this format; `name` for
        the error on NaN or inf values."""
        return quantize(weight, self.quant_type, self.blocksize, self.double_quant, name=name)


def quantize_params(params: Mapping[str, Any], config: QuantConfig | None = None) -> dict:
    """`params` with every linear weight but the head quantized (see `QuantConfig`).

    Stacked layer weights are quantized layer by layer. Weights already quantized are kept.
    """
    config = config or QuantConfig()
    flat = jtree.flatten(params)
    stacked: dict[str, list[QuantizedTensor]] = {}  # path -> its layers, in order
    for module in jtree.hf_modules(params):
        path = f"{module.tree_path}.weight"
        leaf = flat[path]
        if isinstance(leaf, QuantizedTensor) or not config.quantizes(
            module.tree_path, module.shape
        ):
            continue
        weight = jtree.layer_of(leaf, module.layer)
        quantized = config.quantize(weight, name=f"{module.name}.weight")
        if module.layer is None:
            flat[path] = quantized
        else:
            stacked.setdefault(path, []).append(quantized)
    flat.update({path: stack(layers) for path, layers in stacked.items()})
    return jtree.unflatten(flat)


def dequantize_params(params: Mapping[str, Any]) -> dict:
    """`params` with every quantized weight dequantized to the dtype it was quantized from."""
    return jax.tree.map(
        lambda leaf: dequantize(leaf) if isinstance(leaf, QuantizedTensor) else leaf,
        dict(params),
        is_leaf=lambda leaf: isinstance(leaf, QuantizedTensor),
    )


def requantize_like(params: Mapping[str, Any], like: Mapping[str, Any], paths) -> dict:
    """`params` with the leaves at `paths` quantized again in the format their counterparts in
    `like` have (the other quantized leaves of `like` are taken as they are)."""
    flat, reference = jtree.flatten(params), jtree.flatten(like)
    for path, leaf in reference.items():
        if not isinstance(leaf, QuantizedTensor):
            continue
        if path not in paths:
            flat[path] = leaf
            continue
        config = QuantConfig(leaf.quant_type, leaf.blocksize, leaf.double_quant)
        merged = flat[path].astype(leaf.dtype)
        if leaf.stack_shape:
            flat[path] = stack(
                [config.quantize(layer, f"{path} (layer {i})") for i, layer in enumerate(merged)]
            )
        else:
            flat[path] = config.quantize(merged, path)
    return jtree.unflatten(flat)
