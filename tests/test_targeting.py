"""PEFT's module-matching rules: jpeft's implementation against PEFT's own functions."""

from __future__ import annotations

import re

import jax.numpy as jnp
import peft
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from jpeft import LoraConfig, targeting
from jpeft import tree as jtree

LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
PARENTS = ["model.layers", "model.h", "transformer.blocks", "encoder.layer"]
SUBS = ["self_attn", "mlp", "attn.inner"]


@st.composite
def module_names(draw):
    leaf = draw(st.sampled_from(LEAVES))
    if leaf == "lm_head":
        return leaf
    parent = draw(st.sampled_from(PARENTS))
    return f"{parent}.{draw(st.integers(0, 11))}.{draw(st.sampled_from(SUBS))}.{leaf}"


name_lists = st.lists(st.sampled_from(LEAVES + ["self_attn.q_proj", "mlp"]), max_size=3)


@st.composite
def configs(draw):
    kind = draw(st.sampled_from(["list", "regex"]))
    kwargs = {}
    if kind == "list":
        kwargs["target_modules"] = draw(name_lists.filter(bool))
        if draw(st.booleans()):
            layers = draw(st.one_of(st.integers(0, 11), st.lists(st.integers(0, 11), max_size=4)))
            kwargs["layers_to_transform"] = layers
            kwargs["layers_pattern"] = draw(
                st.sampled_from([None, "layers", "h", ["blocks", "layer"]])
            )
    else:
        kwargs["target_modules"] = draw(
            st.sampled_from(
                [r".*\.(q|v)_proj", r"model\.layers\.\d\..*", r".*mlp.*_proj", "lm_head"]
            )
        )
    if draw(st.booleans()):
        kwargs["exclude_modules"] = draw(
            st.one_of(name_lists, st.sampled_from([r".*\.1\..*", r".*k_proj"]))
        )
    if draw(st.booleans()):
        kwargs["modules_to_save"] = draw(st.sampled_from([["lm_head"], ["mlp"], ["down_proj"]]))
    return kwargs


@settings(max_examples=400, deadline=None)
@given(configs(), module_names())
def test_matching_equals_peft(kwargs, name):
    ours = LoraConfig(**kwargs)
    theirs = peft.LoraConfig(**kwargs)
    ref = jtree.ModuleRef(name, name, None, "linear", (4, 4))
    assert targeting.matches_target(ours, ref) == bool(check_target_module_exists(theirs, name))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(LEAVES + ["self_attn.q_proj", r"layers\.1\..*"]), st.integers(1, 9)
    ),
    module_names(),
)
def test_rank_pattern_lookup_equals_peft(patterns, name):
    key = get_pattern_key(list(patterns), name)
    expected = patterns[key] if key in patterns else 8
    assert targeting.pattern_value(patterns, name, 8) == expected


def stacked_params(num_layers: int = 3, tied: bool = False) -> dict:
    proj = {"weight": jnp.zeros((num_layers, 8, 8))}
    params = {
        "model": {
            "embed_tokens": {"weight": jnp.zeros((16, 8))},
            "layers": {
                "self_attn": {"q_proj": proj, "v_proj": proj},
                "mlp": {"down_proj": proj},
                "input_layernorm": {"weight": jnp.zeros((num_layers, 8))},
            },
            "norm": {"weight": jnp.zeros(8)},
        }
    }
    if not tied:
        params["lm_head"] = {"weight": jnp.zeros((16, 8))}
    return params


def test_per_layer_view_of_stacked_params():
    names = [ref.name for ref in jtree.hf_modules(stacked_params())]
    assert "model.layers.2.mlp.down_proj" in names and "lm_head" in names
    assert "model.layers.input_layernorm" not in " ".join(names)
    assert jtree.hf_param_path(stacked_params(), "model.layers.1.mlp.down_proj.weight") == (
        "model.layers.mlp.down_proj.weight",
        1,
    )


def test_all_linear_skips_head_and_embeddings():
    config = LoraConfig(target_modules="all-linear")
    names = {ref.name for ref in targeting.resolve_targets(stacked_params(), config)}
    assert len(names) == 9 and not any("lm_head" in n or "embed" in n for n in names)


def test_no_match_names_target_and_lists_modules():
    config = LoraConfig(target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match=re.escape("['qkv_proj']")) as err:
        targeting.resolve_targets(stacked_params(), config)
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value)


def test_default_targets_need_a_known_model_type():
    config = LoraConfig()
    assert len(targeting.resolve_targets(stacked_params(), config, "llama")) == 6
    with pytest.raises(ValueError, match="target_modules is None"):
        targeting.resolve_targets(stacked_params(), config, None)


def test_tied_head_is_visible_to_modules_to_save():
    names = targeting.resolve_modules_to_save(stacked_params(tied=True), ["lm_head"])
    assert names == ["lm_head.weight"]
    with pytest.raises(ValueError, match="modules_to_save"):
        targeting.resolve_modules_to_save(stacked_params(), ["classifier"])


def test_default_targets_are_pefts():
    """Each per-architecture default (LoRA, AdaLoRA, IA3 and its feed-forward modules, LN
    tuning) is PEFT's own for that model_type."""
    from peft.utils import constants

    from jpeft.methods import adalora, ia3, ln_tuning

    tables = [
        (targeting.DEFAULT_TARGETS, constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
        (adalora.DEFAULT_TARGETS, constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING),
        (ia3.DEFAULT_TARGETS, constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING),
        (ia3.DEFAULT_FEEDFORWARD, constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING),
        (
            ln_tuning.DEFAULT_TARGETS,
            constants.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING,
        ),
    ]
    for ours, peft_table in tables:
        for model_type, names in ours.items():
            assert list(names) == list(peft_table[model_type]), (model_type, names)
