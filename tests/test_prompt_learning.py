"""Prompt tuning, p-tuning and prefix tuning in jpeft: configs, bad input, training, generate.

Numerical parity with PEFT lives in tests/parity/test_prompt_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import TINY_LLAMA

import jpeft
from jpeft import train

TINY = TINY_LLAMA
PROMPT_CONFIGS = {
    "prompt_tuning": jpeft.PromptTuningConfig(num_virtual_tokens=4),
    "p_tuning_lstm": jpeft.PromptEncoderConfig(
        num_virtual_tokens=4,
        encoder_reparameterization_type="LSTM",
        encoder_hidden_size=8,
        encoder_dropout=0.2,
    ),
    "prefix_projection": jpeft.PrefixTuningConfig(
        num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=8
    ),
}


@pytest.fixture(scope="module")
def tiny():
    """(model, params, input ids [2, 7])."""
    model = jpeft.models.from_hf_config(TINY)
    params = model.init(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, TINY["vocab_size"])
    return model, params, ids


@pytest.mark.parametrize("tokens", [0, -1, None, 2.5])
def test_num_virtual_tokens_must_be_positive(tokens):
    with pytest.raises(ValueError, match=r"PromptTuningConfig.num_virtual_tokens must be an integ"):
        jpeft.PromptTuningConfig(num_virtual_tokens=tokens)


def test_text_init_needs_a_tokenizer_and_text():
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        jpeft.PromptTuningConfig(
            num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"
        )
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        jpeft.PromptTuningConfig(
            num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="tok/"
        )
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        jpeft.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="ZEROS")


def test_text_init_with_a_missing_tokenizer_names_the_path(tiny, tmp_path):
    model, params, _ = tiny
    config = jpeft.PromptTuningConfig(
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify",
        tokenizer_name_or_path=str(tmp_path / "nowhere"),
    )
    with pytest.raises(ValueError, match=r"tokenizer_name_or_path=.*nowhere"):
        jpeft.init_adapter(params, config, key=jax.random.key(0), model=model)


def test_sample_vocab_init_copies_rows_of_the_embedding_table(tiny):
    model, params, _ = tiny
    config = jpeft.PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB")
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(0), model=model)
    prompts = np.asarray(adapter.weights["prompt_encoder"]["embedding.weight"])
    table = np.asarray(params["model"]["embed_tokens"]["weight"])
    assert prompts.dtype == np.float32
    for row in prompts:
        assert np.any(np.all(table == row, axis=1))


def test_model_fields_are_filled_and_checked(tiny):
    model, params, _ = tiny
    prefix = jpeft.init_adapter(
        params, jpeft.PrefixTuningConfig(num_virtual_tokens=3), key=jax.random.key(0), model=model
    )
    kv_dim = TINY["num_key_value_heads"] * TINY["hidden_size"] // TINY["num_attention_heads"]
    assert prefix.config.token_dim == kv_dim
    assert prefix.config.num_attention_heads == TINY["num_key_value_heads"]
    assert prefix.config.num_layers == TINY["num_hidden_layers"]
    assert prefix.config.task_type == "CAUSAL_LM" and prefix.config.num_transformer_submodules == 1
    assert prefix.weights["prompt_encoder"]["embedding.weight"].shape == (3, 2 * 2 * kv_dim)
    with pytest.raises(ValueError, match=r"PromptTuningConfig.token_dim=64 but the model has"):
        jpeft.init_adapter(
            params,
            jpeft.PromptTuningConfig(num_virtual_tokens=3, token_dim=64),
            key=jax.random.key(0),
            model=model,
        )
    with pytest.raises(ValueError, match="pass model="):
        jpeft.init_adapter(params, jpeft.PrefixTuningConfig(num_virtual_tokens=3), key=None)


def adapter_for(config, **model_changes):
    """An adapter made for a tiny model that differs from TINY by `model_changes`."""
    other = jpeft.models.from_hf_config({**TINY, **model_changes})
    return jpeft.init_adapter(
        other.init(jax.random.key(0)), config, key=jax.random.key(0), model=other
    )


def test_adapter_for_another_model_is_refused(tiny):
    model, params, ids = tiny
    prefix = jpeft.PrefixTuningConfig(num_virtual_tokens=3)
    with pytest.raises(ValueError, match=r"num_layers=3.*model has 2 layers"):
        model.apply(params, ids, adapter=adapter_for(prefix, num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"4 key/value heads.*model has 2 layers and 2 key/value"):
        model.apply(params, ids, adapter=adapter_for(prefix, num_key_value_heads=4))
    prompt = adapter_for(jpeft.PromptTuningConfig(num_virtual_tokens=3), hidden_size=64)
    with pytest.raises(ValueError, match="token_dim=64 but the model's hidden_size is 32"):
        model.generate(params, ids, 2, adapter=prompt)


def test_encoder_dropout_is_only_for_the_lstm_between_layers():
    with pytest.raises(ValueError, match="encoder_dropout"):
        jpeft.PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=1.0)
    with pytest.raises(ValueError, match="encoder_reparameterization_type"):
        jpeft.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")


def test_prompt_adapters_cannot_be_merged(tiny):
    model, params, _ = tiny
    adapter = jpeft.init_adapter(
        params, PROMPT_CONFIGS["prompt_tuning"], key=jax.random.key(0), model=model
    )
    with pytest.raises(ValueError, match="cannot merge a PROMPT_TUNING adapter"):
        jpeft.merge(params, adapter)


def test_virtual_positions_come_first_and_get_no_loss(tiny):
    model, params, ids = tiny
    adapter = jpeft.init_adapter(
        params, PROMPT_CONFIGS["prompt_tuning"], key=jax.random.key(0), model=model
    )
    logits = model.apply(params, ids, adapter=adapter)
    assert logits.shape == (2, 4 + 7, TINY["vocab_size"])
    labels = np.asarray(ids)
    aligned = train.with_virtual_labels(jnp.asarray(labels), logits.shape[1])
    assert (np.asarray(aligned[:, :4]) == train.IGNORE_INDEX).all()
    np.testing.assert_array_equal(np.asarray(aligned[:, 4:]), labels)
    # The real tokens' logits depend on the virtual tokens, and only through them.
    base = model.apply(params, ids)
    assert not np.allclose(np.asarray(logits[:, 4:]), np.asarray(base), atol=1e-3)


@pytest.mark.parametrize("name", sorted(PROMPT_CONFIGS))
def test_train_step_learns_the_prompt_only(tiny, name):
    model, params, ids = tiny
    adapter = jpeft.init_adapter(params, PROMPT_CONFIGS[name], key=jax.random.key(0), model=model)
    shapes = {k: v.shape for k, v in adapter.weights["prompt_encoder"].items()}
    optimizer = optax.adam(0.1)
    opt_state = optimizer.init(jpeft.partition(adapter)[0])
    step = train.make_train_step(model, optimizer)
    batch = {"input_ids": ids, "labels": ids}
    losses = []
    for i in range(8):
        adapter, opt_state, loss = step(params, adapter, opt_state, batch, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.02, losses  # a 0.02-std random model is near uniform
    assert {k: v.shape for k, v in adapter.weights["prompt_encoder"].items()} == shapes
    tokens = model.generate(params, ids, 3, adapter=adapter)
    assert tokens.shape == (2, 7 + 3)


def test_generate_with_a_prefix_continues_apply(tiny):
    """The first generated token is apply's argmax at the last position, with and without the
    prefix cache: generate and apply agree on positions and masks."""
    model, params, ids = tiny
    for config in (PROMPT_CONFIGS["prefix_projection"], PROMPT_CONFIGS["prompt_tuning"]):
        adapter = jpeft.init_adapter(params, config, key=jax.random.key(0), model=model)
        logits = model.apply(params, ids, adapter=adapter)
        tokens = model.generate(params, ids, 1, adapter=adapter)
        np.testing.assert_array_equal(
            np.asarray(tokens[:, -1]), np.asarray(jnp.argmax(logits[:, -1], -1))
        )
