"""LoraConfig: PEFT's field names, defaults and JSON, both ways."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest

from jpeft import LoraConfig
from jpeft.method import config_from_dict

KWARGS = [
    {},
    dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05),
    dict(target_modules="all-linear", use_dora=True, use_rslora=True, bias="lora_only"),
    dict(
        target_modules=["down_proj"],
        layers_to_transform=[0, 3],
        layers_pattern="layers",
        rank_pattern={"down_proj": 4},
        alpha_pattern={"model.layers.3.mlp.down_proj": 2},
        modules_to_save=["lm_head"],
        init_lora_weights="gaussian",
        task_type="CAUSAL_LM",
    ),
]


def peft_json(kwargs, tmp_path) -> dict:
    peft.LoraConfig(**kwargs).save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("kwargs", KWARGS)
def test_json_matches_peft(kwargs, tmp_path):
    theirs = peft_json(kwargs, tmp_path)
    ours = LoraConfig(**kwargs).to_dict()
    assert set(ours) == set(theirs)
    for key in set(theirs) - {"peft_version", "target_modules", "modules_to_save"}:
        assert ours[key] == theirs[key], key
    for key in ("target_modules", "modules_to_save"):
        value = theirs[key]
        assert (sorted(ours[key]) if isinstance(value, list) else ours[key]) == (
            sorted(value) if isinstance(value, list) else value
        )


@pytest.mark.parametrize("kwargs", KWARGS)
def test_reads_peft_json(kwargs, tmp_path):
    config = config_from_dict(peft_json(kwargs, tmp_path))
    assert isinstance(config, LoraConfig)
    expected = LoraConfig(**kwargs)
    for field in dataclasses.fields(LoraConfig):
        ours, theirs = getattr(config, field.name), getattr(expected, field.name)
        if field.name in ("target_modules", "modules_to_save") and isinstance(ours, tuple):
            ours, theirs = sorted(ours), sorted(theirs)
        if field.name != "inference_mode":
            assert ours == theirs, field.name
    assert hash(config) == hash(config_from_dict(config.to_dict()))


def test_peft_defaults():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for field in dataclasses.fields(LoraConfig):
        if field.name not in ("rank_pattern", "alpha_pattern", "loftq_config"):
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name


def test_unknown_keys_warn_and_unsupported_values_raise():
    data = LoraConfig(target_modules=["q_proj"]).to_dict()
    with pytest.warns(UserWarning, match="future_field"):
        config_from_dict({**data, "future_field": 1})
    with pytest.raises(ValueError, match="use_qalora=True"):
        config_from_dict({**data, "use_qalora": True})
    with pytest.raises(ValueError, match="unknown peft_type 'NOPE'"):
        config_from_dict({**data, "peft_type": "NOPE"})
    with pytest.raises(ValueError, match="no 'peft_type'"):
        config_from_dict({"r": 8})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer, got r=0"),
        (dict(r=-2), "got r=-2"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
        (dict(bias="some"), "bias must be"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform"),
        (dict(init_lora_weights="loftq"), "init_lora_weights='loftq'"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)
