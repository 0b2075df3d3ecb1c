"""What the prompt-learning methods share: PEFT's common config fields and their model defaults.

Prompt tuning, p-tuning and prefix tuning leave every weight as it is. Their adapter holds one
"prompt encoder" under `adapter.weights[PROMPT_ENCODER]`, with PEFT's own parameter names
(`embedding.weight` [T, token_dim], `mlp_head.0.weight`, ...), and the method turns it into a
`jpeft.adapter.Prompt`: virtual token embeddings or an attention prefix.

PEFT saves only the encoder's output (`prompt_embeddings`); an adapter loaded from a file holds it
as `embedding.weight` alone and uses it as is, as PEFT does in inference mode.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import tree as jtree
from jpeft.adapter import PROMPT_ENCODER, Adapter
from jpeft.config import PeftConfig

EMBEDDING = "embedding.weight"
CAUSAL_LM = "CAUSAL_LM"  # the task of every jpeft model
Pieces = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PromptLearningConfig(PeftConfig):
    """PEFT's `PromptLearningConfig` fields. The model-dependent ones (`token_dim`, `num_layers`,
    `num_attention_heads`, `num_transformer_submodules`) are filled by `init_adapter` from the
    model when None, as PEFT does, and saved."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: Sequence[str] | None = None

    def validate(self) -> None:
        name = type(self).__name__
        tokens = self.num_virtual_tokens
        if tokens is None or tokens < 1:
            raise ValueError(f"{name}.num_virtual_tokens must be an integer >= 1, got {tokens!r}")
        for field in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"{name}.{field} must be >= 1 (or null), got {value}")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(
                f"{name}.num_transformer_submodules={self.num_transformer_submodules} is for "
                "encoder-decoder models; jpeft's models are decoder-only (use 1 or None)"
            )
        if self.modules_to_save:
            raise ValueError(
                f"{name}.modules_to_save={list(self.modules_to_save)!r}: jpeft supports "
                "modules_to_save with LoRA and IA3, not with prompt-learning methods"
            )


def model_dims(params: Mapping[str, Any], model: Any) -> dict[str, int | None]:
    """The sizes PEFT reads from the model config: hidden size, layers, heads, kv heads, head dim.

    From `model.config` when a model is given; otherwise what the params show (heads unknown).
    """
    config = getattr(model, "config", None)
    if config is not None:
        return dict(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
        )
    table = jtree.get_path(params, "model.embed_tokens.weight")
    return dict(
        hidden_size=int(table.shape[-1]),
        num_layers=jtree.num_stacked_layers(params),
        num_attention_heads=None,
        num_key_value_heads=None,
        head_dim=None,
    )


def fill_from_model(config: PromptLearningConfig, model_values: Mapping[str, Any]):
    """`config` with its None model fields set to `model_values` (and task_type CAUSAL_LM, without
    which PEFT's `PeftModel` ignores the prompt); a field the user set must agree with the
    model, else ValueError naming both values."""
    changes = {}
    if config.num_transformer_submodules is None:
        changes["num_transformer_submodules"] = 1
    if config.task_type is None:
        changes["task_type"] = CAUSAL_LM  # PEFT applies prompts only with a task type
    for field, value in model_values.items():
        current = getattr(config, field)
        if current is None:
            if value is None:
                raise ValueError(
                    f"{type(config).__name__}.{field} is None and cannot be read from the params "
                    "alone; pass model= to jpeft.init_adapter (or set the field)"
                )
            changes[field] = value
        elif value is not None and current != value:
            raise ValueError(
                f"{type(config).__name__}.{field}={current} but the model has {field}={value}; "
                f"leave {field}=None to take the model's value"
            )
    return config.replace(**changes)


def fill_for_virtual_tokens(config: PromptLearningConfig, params, model):
    """`fill_from_model` for methods whose virtual tokens live in the embedding space
    (token_dim = hidden size), as PEFT fills prompt tuning and p-tuning configs."""
    dims = model_dims(params, model)
    return fill_from_model(
        config,
        dict(
            token_dim=dims["hidden_size"],
            num_layers=dims["num_layers"],
            num_attention_heads=dims["num_attention_heads"],
        ),
    )


def encoder(adapter: Adapter) -> Pieces:
    """The prompt encoder's parameters, by PEFT's names."""
    return adapter.weights[PROMPT_ENCODER]


def is_loaded_output(pieces: Pieces) -> bool:
    """True when only `embedding.weight` is there: the encoder's saved output, used as is."""
    return set(pieces) == {EMBEDDING}


def torch_linear_init(key: jax.Array, in_dim: int, out_dim: int, name: str) -> Pieces:
    """`{name}.weight` [out, in] and `{name}.bias` [out], drawn as torch's nn.Linear draws them:
    U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_dim)
    key_w, key_b = jax.random.split(key)
    return {
        f"{name}.weight": jax.random.uniform(key_w, (out_dim, in_dim), jnp.float32, -bound, bound),
        f"{name}.bias": jax.random.uniform(key_b, (out_dim,), jnp.float32, -bound, bound),
    }


def dense(x: jax.Array, pieces: Pieces, name: str) -> jax.Array:
    """nn.Linear `name` of the encoder: `x` [..., in] -> [..., out]."""
    return x @ pieces[f"{name}.weight"].T + pieces[f"{name}.bias"]
