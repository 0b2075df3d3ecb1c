"""PEFT file format: round trips of keys, shapes and bytes, and clear errors on bad files."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import jpeft

LAYERS = 3


def stacked_params() -> dict:
    key = jax.random.key(0)
    return {
        "model": {
            "layers": {
                "self_attn": {
                    "q_proj": {"weight": jax.random.normal(key, (LAYERS, 12, 8))},
                    "v_proj": {
                        "weight": jax.random.normal(key, (LAYERS, 4, 8)),
                        "bias": jnp.ones((LAYERS, 4)),
                    },
                }
            }
        },
        "lm_head": {"weight": jnp.ones((10, 8))},
    }


@settings(max_examples=25, deadline=None)
@given(
    r=st.integers(1, 6),
    layers=st.one_of(st.none(), st.lists(st.integers(0, LAYERS - 1), min_size=1, unique=True)),
    use_dora=st.booleans(),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    save_head=st.booleans(),
)
def test_save_load_roundtrip_keeps_keys_and_bytes(
    tmp_path_factory, r, layers, use_dora, bias, save_head
):
    config = jpeft.LoraConfig(
        r=r,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=layers,
        use_dora=use_dora,
        bias=bias,
        modules_to_save=["lm_head"] if save_head else None,
        init_lora_weights=False,
    )
    adapter = jpeft.init_adapter(stacked_params(), config, key=jax.random.key(1))
    path = tmp_path_factory.mktemp("adapter")
    jpeft.save_pretrained(adapter, path)
    loaded = jpeft.load_pretrained(path)
    assert loaded.config == config.replace(inference_mode=True)
    for module, pieces in adapter.weights.items():
        for piece, value in pieces.items():
            np.testing.assert_array_equal(loaded.weights[module][piece], value)
    assert set(loaded.overrides) == set(adapter.overrides)
    keys = set(load_file(path / "adapter_model.safetensors"))
    wanted_layers = layers if layers is not None else range(LAYERS)
    for layer in wanted_layers:
        assert f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight" in keys
    if bias != "none":
        assert (
            f"base_model.model.model.layers.{wanted_layers[0]}.self_attn.v_proj.base_layer.bias"
            in keys
        )
    assert ("base_model.model.lm_head.weight" in keys) == save_head


@pytest.fixture
def saved(tmp_path):
    config = jpeft.LoraConfig(r=2, target_modules=["q_proj"])
    jpeft.save_pretrained(
        jpeft.init_adapter(stacked_params(), config, key=jax.random.key(0)), tmp_path
    )
    return tmp_path


def test_missing_config_names_the_file(saved):
    (saved / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        jpeft.load_pretrained(saved)


def test_truncated_weights_name_the_file(saved):
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors"):
        jpeft.load_pretrained(saved)


def test_unknown_peft_type_names_the_value(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "SUPERLORA"}))
    with pytest.raises(ValueError, match="unknown peft_type 'SUPERLORA'"):
        jpeft.load_pretrained(saved)


def test_pickled_weights_are_never_read(saved):
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(b"not opened")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        jpeft.load_pretrained(saved)


def test_invalid_json_names_the_file(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        jpeft.load_pretrained(saved)
