"""P-tuning (Liu et al. 2021, https://arxiv.org/abs/2103.10385), as PEFT's `PromptEncoder`.

T virtual token embeddings `embedding.weight` [T, d] go through a trained encoder and the output
[T, d] is put before the input embeddings, like prompt tuning's. The encoders, with PEFT's layer
names and shapes (d = token_dim, h = encoder_hidden_size, default d):

    MLP:  mlp_head.0 Linear(d, h) - ReLU - mlp_head.2 Linear(h, h) - ReLU - mlp_head.4 Linear(h, d)
    LSTM: lstm_head: bidirectional LSTM(d -> h), `encoder_num_layers` layers, dropout
          `encoder_dropout` between layers; then mlp_head.0 Linear(2h, 2h) - ReLU -
          mlp_head.2 Linear(2h, d)

PEFT saves the encoder's output, not the encoder; a loaded adapter uses that output as is.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from jpeft.adapter import PROMPT_ENCODER, Adapter, Prompt
from jpeft.method import JobSpec, PromptMethod, register
from jpeft.methods import prompt_learning as pl

ENCODERS = ("MLP", "LSTM")


@dataclasses.dataclass(frozen=True)
class PromptEncoderConfig(pl.PromptLearningConfig):
    """PEFT's `PromptEncoderConfig`: same field names, defaults and JSON."""

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in ENCODERS:
            raise ValueError(
                "PromptEncoderConfig.encoder_reparameterization_type must be one of "
                f"{ENCODERS}, got {self.encoder_reparameterization_type!r}"
            )
        if self.encoder_num_layers < 1:
            raise ValueError(
                "PromptEncoderConfig.encoder_num_layers must be an integer >= 1, got "
                f"{self.encoder_num_layers!r}"
            )
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(
                f"PromptEncoderConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout}"
            )


def _init_adapter(params, config: PromptEncoderConfig, key, model=None) -> Adapter:
    """The embedding (N(0, 1)) and encoder (torch's default inits) in float32."""
    config = pl.fill_for_virtual_tokens(config, params, model)
    if config.encoder_hidden_size is None:
        config = config.replace(encoder_hidden_size=config.token_dim)
    if config.encoder_reparameterization_type == "MLP" and config.encoder_num_layers != 2:
        warnings.warn(
            f"PromptEncoderConfig.encoder_num_layers={config.encoder_num_layers} is ignored by "
            "the MLP encoder, which always has 2 hidden layers (as in PEFT)",
            stacklevel=3,
        )
    d, h = config.token_dim, config.encoder_hidden_size
    key_embedding, key_encoder = jax.random.split(key)
    pieces = {
        pl.EMBEDDING: jax.random.normal(key_embedding, (config.num_virtual_tokens, d), jnp.float32)
    }
    keys = iter(jax.random.split(key_encoder, 3 + 2 * config.encoder_num_layers))
    if config.encoder_reparameterization_type == "MLP":
        for name, (n_in, n_out) in {
            "mlp_head.0": (d, h),
            "mlp_head.2": (h, h),
            "mlp_head.4": (h, d),
        }.items():
            pieces.update(pl.torch_linear_init(next(keys), n_in, n_out, name))
    else:
        for layer in range(config.encoder_num_layers):
            for suffix in ("", "_reverse"):
                n_in = d if layer == 0 else 2 * h
                pieces.update(_lstm_init(next(keys), n_in, h, f"l{layer}{suffix}"))
        pieces.update(pl.torch_linear_init(next(keys), 2 * h, 2 * h, "mlp_head.0"))
        pieces.update(pl.torch_linear_init(next(keys), 2 * h, d, "mlp_head.2"))
    return Adapter(config, {PROMPT_ENCODER: pieces})


def _lstm_init(key, in_dim: int, hidden: int, suffix: str) -> dict[str, jax.Array]:
    """One direction of one nn.LSTM layer, U(-1/sqrt(h), 1/sqrt(h)) like torch:
    weight_ih [4h, in], weight_hh [4h, h], bias_ih / bias_hh [4h] (gates i, f, g, o)."""
    bound = 1.0 / math.sqrt(hidden)
    shapes = {
        "weight_ih": (4 * hidden, in_dim),
        "weight_hh": (4 * hidden, hidden),
        "bias_ih": (4 * hidden,),
        "bias_hh": (4 * hidden,),
    }
    keys = jax.random.split(key, len(shapes))
    return {
        f"lstm_head.{name}_{suffix}": jax.random.uniform(k, shape, jnp.float32, -bound, bound)
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


def _lstm_direction(pieces, suffix: str, x: jax.Array, reverse: bool) -> jax.Array:
    """One direction of an LSTM layer over the sequence `x` [T, in] -> hidden states [T, h]."""
    w_ih, w_hh = pieces[f"lstm_head.weight_ih_{suffix}"], pieces[f"lstm_head.weight_hh_{suffix}"]
    bias = pieces[f"lstm_head.bias_ih_{suffix}"] + pieces[f"lstm_head.bias_hh_{suffix}"]
    hidden = w_hh.shape[1]
    inputs = x @ w_ih.T + bias  # [T, 4h]

    def step(carry, gates_x):
        h, c = carry
        i, f, g, o = jnp.split(gates_x + h @ w_hh.T, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), x.dtype)
    _, out = lax.scan(step, (zeros, zeros), inputs, reverse=reverse)
    return out


def _lstm(pieces, config: PromptEncoderConfig, x: jax.Array, dropout_key) -> jax.Array:
    """The bidirectional multi-layer LSTM: `x` [T, d] -> [T, 2h] (forward, backward halves)."""
    for layer in range(config.encoder_num_layers):
        if layer and dropout_key is not None and config.encoder_dropout > 0:
            keep = 1.0 - config.encoder_dropout
            mask = jax.random.bernoulli(jax.random.fold_in(dropout_key, layer), keep, x.shape)
            x = jnp.where(mask, x / keep, 0.0)
        x = jnp.concatenate(
            [
                _lstm_direction(pieces, f"l{layer}", x, reverse=False),
                _lstm_direction(pieces, f"l{layer}_reverse", x, reverse=True),
            ],
            axis=-1,
        )
    return x


def encode(adapter: Adapter, dropout_key=None) -> jax.Array:
    """The virtual token embeddings [T, d]: the encoder's output (or a loaded output as is)."""
    pieces = pl.encoder(adapter)
    x = pieces[pl.EMBEDDING]
    if pl.is_loaded_output(pieces):
        return x
    config = adapter.config
    if config.encoder_reparameterization_type == "LSTM":
        x = _lstm(pieces, config, x, dropout_key)
        return pl.dense(jax.nn.relu(pl.dense(x, pieces, "mlp_head.0")), pieces, "mlp_head.2")
    x = jax.nn.relu(pl.dense(x, pieces, "mlp_head.0"))
    x = jax.nn.relu(pl.dense(x, pieces, "mlp_head.2"))
    return pl.dense(x, pieces, "mlp_head.4")


def _prompt(adapter: Adapter, dropout_key=None) -> Prompt:
    return Prompt(embeddings=encode(adapter, dropout_key))


@register
class PTuning(PromptMethod):
    peft_type = "P_TUNING"
    name = "p-tuning"
    config_class = PromptEncoderConfig
    default_lr = 0.003
    job_help = "p-tuning, PEFT's MLP prompt encoder, --virtual-tokens"

    def init_adapter(self, params, config: PromptEncoderConfig, key, model=None) -> Adapter:
        return _init_adapter(params, config, key, model)

    def prompt(self, adapter: Adapter, dropout_key=None) -> Prompt:
        return _prompt(adapter, dropout_key)

    def prompt_embeddings(self, adapter: Adapter) -> jax.Array:
        return encode(adapter)

    def job_config(self, job: JobSpec) -> PromptEncoderConfig:
        """PEFT's MLP prompt encoder."""
        return PromptEncoderConfig(num_virtual_tokens=job.virtual_tokens, **job.common)
