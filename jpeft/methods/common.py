"""What the weight-changing methods (LoRA, IA3) share: model type, base-leaf copies, warnings."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import tree as jtree
from jpeft.quant import QuantizedTensor


def adapter_dtype(weight: Any) -> jnp.dtype:
    """The dtype of adapter pieces for a base weight: its own, or float32 for a 4-bit weight
    (PEFT keeps adapters on bitsandbytes layers in float32 as well)."""
    if isinstance(weight, QuantizedTensor):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(weight.dtype)


def model_type_of(model: Any) -> str | None:
    """`model.config.model_type` ("llama", "qwen2", ...), or None without a model."""
    return getattr(getattr(model, "config", None), "model_type", None)


def warn_fan_in_fan_out(config: Any) -> None:
    """PEFT's `fan_in_fan_out` concerns GPT-2's Conv1D; jpeft weights are all [out, in]."""
    if config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out=True has no effect: jpeft weights are [out, in] like nn.Linear "
            "(PEFT resets it to False for nn.Linear too)",
            stacklevel=4,
        )


def base_leaf_copies(params: Mapping[str, Any], names: Iterable[str]) -> dict[str, jax.Array]:
    """Trainable copies {HF parameter name: array} of base leaves (modules_to_save, biases).

    A stacked leaf gives its layer's slice; a tied head's copy starts from the embedding table.
    """
    copies = {}
    for name in dict.fromkeys(names):
        tree_path, layer = jtree.hf_param_path(params, name)
        leaf = jtree.get_path(params, jtree.tied_head_source(params, tree_path))
        if isinstance(leaf, QuantizedTensor):
            raise ValueError(
                f"{name} is a 4-bit quantized weight, which cannot be trained; leave it out of "
                "modules_to_save, or load that module unquantized"
            )
        copies[name] = jnp.array(leaf if layer is None else leaf[layer])
    return copies
