"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190), as PEFT does it.

Every attention layer gets T learned key and value vectors per key/value head, placed before the
real tokens' keys (they carry no rotary embedding); the real tokens' positions start at T. The
learned tensor is [T, L * 2 * kv_dim] (kv_dim = K * head_dim: PEFT sizes the prefix for the
key/value heads of GQA models), either directly (`embedding.weight`) or, with
`prefix_projection`, as `transform.2(tanh(transform.0(embedding)))` from an embedding [T, kv_dim].
Within a row the L * 2 slots run (keys of layer 0, values of layer 0, keys of layer 1, ...), each
split over the K heads. PEFT saves that [T, L * 2 * kv_dim] tensor.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.adapter import PROMPT_ENCODER, Adapter, Prompt
from jpeft.method import JobSpec, PromptMethod, register
from jpeft.methods import prompt_learning as pl


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(pl.PromptLearningConfig):
    """PEFT's `PrefixTuningConfig`: same field names, defaults and JSON. For a GQA model,
    `token_dim` is the key/value width (K * head_dim) and `num_attention_heads` is K, as PEFT
    fills them."""

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ValueError(
                f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}"
            )


def _init_adapter(params, config: PrefixTuningConfig, key, model=None) -> Adapter:
    """The prefix (N(0, 1), or zeros with init_weights='zero') and, with `prefix_projection`,
    the two-layer tanh MLP (torch's Linear init; the last layer zero with init_weights='zero')."""
    dims = pl.model_dims(params, model)
    heads, head_dim = dims["num_key_value_heads"], dims["head_dim"]
    config = pl.fill_from_model(
        config,
        dict(
            token_dim=None if heads is None else heads * head_dim,
            num_layers=dims["num_layers"],
            num_attention_heads=heads,
        ),
    )
    if config.encoder_hidden_size is None:
        config = config.replace(encoder_hidden_size=config.token_dim)
    tokens, width = config.num_virtual_tokens, _prefix_width(config)
    key_embedding, key_first, key_last = jax.random.split(key, 3)
    zero = config.init_weights == "zero"
    if not config.prefix_projection:
        shape = (tokens, width)
        embedding = jnp.zeros(shape) if zero else jax.random.normal(key_embedding, shape)
        return Adapter(config, {PROMPT_ENCODER: {pl.EMBEDDING: embedding}})
    hidden = config.encoder_hidden_size
    pieces = {pl.EMBEDDING: jax.random.normal(key_embedding, (tokens, config.token_dim))}
    pieces.update(pl.torch_linear_init(key_first, config.token_dim, hidden, "transform.0"))
    last = pl.torch_linear_init(key_last, hidden, width, "transform.2")
    pieces.update(jax.tree.map(jnp.zeros_like, last) if zero else last)
    return Adapter(config, {PROMPT_ENCODER: pieces})


# The config fields the saved prefix [T, L * 2 * K * hd] is read by.
LAYOUT_FIELDS = ("num_layers", "token_dim", "num_attention_heads")


def _prefix_width(config: PrefixTuningConfig) -> int:
    return config.num_layers * 2 * config.token_dim


def prompt_embeddings(adapter: Adapter) -> jax.Array:
    """The prefix as PEFT saves it: [T, L * 2 * kv_dim]."""
    pieces = pl.encoder(adapter)
    if pl.is_loaded_output(pieces) or not adapter.config.prefix_projection:
        return pieces[pl.EMBEDDING]
    hidden = jnp.tanh(pl.dense(pieces[pl.EMBEDDING], pieces, "transform.0"))
    return pl.dense(hidden, pieces, "transform.2")


def _prompt(adapter: Adapter, dropout_key=None) -> Prompt:
    """Per-layer keys and values [L, K, T, hd] from the [T, L * 2 * K * hd] prefix."""
    config = adapter.config
    flat = prompt_embeddings(adapter)
    heads = config.num_attention_heads
    tokens, width = flat.shape
    if width != _prefix_width(config) or config.token_dim % heads:
        raise ValueError(
            f"prefix tuning: prompt_embeddings has shape {tuple(flat.shape)} but the config's "
            f"num_layers={config.num_layers}, token_dim={config.token_dim} and "
            f"num_attention_heads={heads} need [T, {_prefix_width(config)}]"
        )
    slots = flat.reshape(tokens, config.num_layers, 2, heads, config.token_dim // heads)
    keys, values = (slots[:, :, i].transpose(1, 2, 0, 3) for i in (0, 1))
    return Prompt(keys=keys, values=values)


@register
class PrefixTuning(PromptMethod):
    peft_type = "PREFIX_TUNING"
    name = "prefix-tuning"
    config_class = PrefixTuningConfig
    default_lr = 0.01
    job_help = "prefix tuning, a zero-initialised key/value prefix of --virtual-tokens"
    SHAPE_FIELDS = ("num_virtual_tokens", "num_layers", "token_dim")

    def init_adapter(self, params, config: PrefixTuningConfig, key, model=None) -> Adapter:
        return _init_adapter(params, config, key, model)

    def prompt(self, adapter: Adapter, dropout_key=None) -> Prompt:
        return _prompt(adapter, dropout_key)

    def prompt_embeddings(self, adapter: Adapter) -> jax.Array:
        return prompt_embeddings(adapter)

    def saved_shape(self, config: PrefixTuningConfig) -> tuple[int, int]:
        """[num_virtual_tokens, num_layers * 2 * token_dim]: PEFT saves the prefix of the
        virtual tokens once, every layer's keys and values side by side."""
        return config.num_virtual_tokens, _prefix_width(config)

    def from_file(self, config: PrefixTuningConfig, tensors, params, source: str) -> Adapter:
        """The prefix, laid out by the config's `LAYOUT_FIELDS`, which must be set: PEFT fills
        null ones from the model config it loads with, jpeft reads the file alone."""
        missing = [field for field in LAYOUT_FIELDS if getattr(config, field) is None]
        if missing:
            raise ValueError(
                f"{source}: a PREFIX_TUNING adapter_config.json needs {', '.join(LAYOUT_FIELDS)} "
                f"(the prefix's layout), but it has null for {', '.join(missing)}; set them from "
                "the model config (token_dim: key/value heads x head_dim, num_attention_heads: "
                "key/value heads)"
            )
        return super().from_file(config, tensors, params, source)

    def job_config(self, job: JobSpec) -> PrefixTuningConfig:
        """A key/value prefix in every layer starting from zeros (PEFT's default N(0, 1) prefix
        scrambles a pretrained model's attention: SmolLM2's loss starts near 9 with it)."""
        return PrefixTuningConfig(
            num_virtual_tokens=job.virtual_tokens, init_weights="zero", **job.common
        )
