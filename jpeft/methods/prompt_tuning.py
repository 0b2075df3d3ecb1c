"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691), as PEFT does it.

T learned "virtual token" embeddings `embedding.weight` [T, hidden] are put before the input
embeddings; the model's outputs cover T + S positions, virtual first. Initialisation:
RANDOM draws N(0, 1) (nn.Embedding's init); SAMPLE_VOCAB copies the embeddings of T random vocab
ids; TEXT tokenizes `prompt_tuning_init_text` and copies its token embeddings, the ids repeated or
cut to T.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import tree as jtree
from jpeft.adapter import PROMPT_ENCODER, Adapter, Prompt
from jpeft.method import JobSpec, PromptMethod, register
from jpeft.methods import prompt_learning as pl

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(pl.PromptLearningConfig):
    """PEFT's `PromptTuningConfig`: same field names, defaults and JSON."""

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: Mapping[str, Any] | None = None

    def validate(self) -> None:
        super().validate()
        init = self.prompt_tuning_init
        if init not in INITS:
            raise ValueError(
                f"PromptTuningConfig.prompt_tuning_init must be one of {INITS}, got {init!r}"
            )
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise ValueError(
                "PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a "
                f"tokenizer directory or .gguf file), got {self.tokenizer_name_or_path!r}"
            )
        if init == "TEXT" and self.prompt_tuning_init_text is None:
            raise ValueError(
                "PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text"
            )
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError(
                "PromptTuningConfig.tokenizer_kwargs is only used with prompt_tuning_init='TEXT', "
                f"got prompt_tuning_init={init!r}"
            )


def _init_adapter(params, config: PromptTuningConfig, key, model=None) -> Adapter:
    """Virtual token embeddings [T, hidden] in float32, initialised as `prompt_tuning_init` says."""
    config = pl.fill_for_virtual_tokens(config, params, model)
    table = jtree.get_path(params, "model.embed_tokens.weight")
    tokens = config.num_virtual_tokens
    if config.prompt_tuning_init == "RANDOM":
        embedding = jax.random.normal(key, (tokens, config.token_dim), jnp.float32)
    else:
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = jax.random.randint(key, (tokens,), 0, table.shape[0])
        else:
            ids = jnp.asarray(init_text_ids(config))
        # PEFT reads the model's embedding layer: Gemma's scales the rows (pass model= for it)
        embed = getattr(model, "embed_tokens", None)
        rows = embed(params, ids) if embed is not None else jnp.take(table, ids, axis=0)
        embedding = rows.astype(jnp.float32)
    return Adapter(config, {PROMPT_ENCODER: {pl.EMBEDDING: embedding}})


def init_text_ids(config: PromptTuningConfig) -> list[int]:
    """The init text's token ids (special tokens included, as the tokenizer's `__call__` gives
    them), repeated or cut to `num_virtual_tokens`."""
    from jpeft.tokenizer import load_tokenizer

    source = config.tokenizer_name_or_path
    try:
        tokenizer = load_tokenizer(source, **dict(config.tokenizer_kwargs or {}))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"PromptTuningConfig.tokenizer_name_or_path={source!r} could not be loaded: {err}"
        ) from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(
            f"PromptTuningConfig.prompt_tuning_init_text={config.prompt_tuning_init_text!r} "
            "tokenizes to no tokens"
        )
    tokens = config.num_virtual_tokens
    return (ids * math.ceil(tokens / len(ids)))[:tokens]


def prompt_embeddings(adapter: Adapter) -> jax.Array:
    """[T, hidden]: the learned embeddings, which is what PEFT saves."""
    return pl.encoder(adapter)[pl.EMBEDDING]


def _prompt(adapter: Adapter, dropout_key=None) -> Prompt:
    return Prompt(embeddings=prompt_embeddings(adapter))


@register
class PromptTuning(PromptMethod):
    peft_type = "PROMPT_TUNING"
    name = "prompt-tuning"
    config_class = PromptTuningConfig
    default_lr = 0.03
    job_help = "prompt tuning, --virtual-tokens initialised from the task instruction (TEXT)"

    def init_adapter(self, params, config: PromptTuningConfig, key, model=None) -> Adapter:
        return _init_adapter(params, config, key, model)

    def prompt(self, adapter: Adapter, dropout_key=None) -> Prompt:
        return _prompt(adapter, dropout_key)

    def prompt_embeddings(self, adapter: Adapter) -> jax.Array:
        return prompt_embeddings(adapter)

    def job_config(self, job: JobSpec) -> PromptTuningConfig:
        """Virtual tokens initialised from the task instruction's tokens (PEFT's TEXT init), so
        training starts from a prompt that already describes the task."""
        return PromptTuningConfig(
            num_virtual_tokens=job.virtual_tokens,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=job.instruction,
            tokenizer_name_or_path=job.model_path,
            **job.common,
        )
