"""LoKr against PyTorch PEFT, both directions, on tiny random Llama and Qwen2 models.

As test_loha_parity.py (with `two_way.py`'s checks): PEFT's perturbed adapter loads in jpeft with
PEFT's logits, merged or not; jpeft's perturbed adapter loads in PEFT with jpeft's logits; saved
keys, shapes, init and adapter_config.json equal PEFT's. The configs cover every piece layout
PEFT picks on these sizes (hidden 32 = 4 * 8, intermediate 48 = 6 * 8, k/v 16 = 4 * 4): full w1
and w2, factored w2, factored w1 (decompose_both), a dividing decompose_factor (4, and 16 whose
split is (16, 2), larger first), a non-dividing one (3, PEFT's fallback search), and the three
inits (True, False, "lycoris").
"""

from __future__ import annotations

import jax
import peft
import pytest
from hf_bases import load_hf
from peft.tuners.lokr.layer import factorization as peft_factorization
from test_loha_parity import check_dropouts
from two_way import two_way_tests

import jpeft
from jpeft.methods.lokr import factorization
from jpeft.quant import quantize_params

CONFIGS = {
    "defaults": {},  # r=8: full w1 [4, 4] and w2
    "factored_dropout": dict(
        r=2,
        alpha=4,
        target_modules="all-linear",
        rank_dropout=0.2,
        module_dropout=0.1,
        rank_dropout_scale=True,
    ),
    "decompose_both": dict(
        r=1, alpha=2, decompose_both=True, target_modules=["q_proj", "down_proj"]
    ),
    "factor_4": dict(
        r=2,
        decompose_factor=4,
        target_modules=["q_proj", "up_proj", "down_proj"],
        init_weights=False,
    ),
    "factor_16": dict(r=8, decompose_factor=16, target_modules=["q_proj", "gate_proj"]),
    "factor_3": dict(r=2, decompose_factor=3, target_modules=["k_proj", "up_proj"]),
    "lycoris": dict(
        r=2, init_weights="lycoris", target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 8}
    ),
    "patterns_layers": dict(
        r=2,
        alpha=4,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 1, "down_proj": 3},
        alpha_pattern={"q_proj": 3},
        layers_to_transform=[0, 1],
    ),
}
CASES = [("llama", name) for name in CONFIGS]
CASES += [("qwen2", name) for name in ("defaults", "factored_dropout", "decompose_both")]


test_peft_adapter_loads_in_jpeft, test_jpeft_adapter_loads_in_peft = two_way_tests(
    "LoKrConfig", CONFIGS, CASES
)


def test_factorization_matches_peft():
    expected = {
        (4096, -1): (64, 64),
        (3072, -1): (48, 64),
        (1024, -1): (32, 32),
        (11008, -1): (86, 128),
        (14336, -1): (112, 128),
        (2048, -1): (32, 64),
        (127, -1): (1, 127),
        (3072, 4): (4, 768),
        (1024, 4): (4, 256),
        (100, 3): (2, 50),
        (64, 16): (16, 4),
    }
    for (dimension, factor), pair in expected.items():
        assert factorization(dimension, factor) == pair, (dimension, factor)
    for dimension in range(1, 400):
        for factor in (-2, -1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 64, 1000):
            got = factorization(dimension, factor)
            assert got == peft_factorization(dimension, factor), (dimension, factor)


def test_dropouts_are_training_only_and_mask_rows():
    """Rank dropout rescales the kept rows only with rank_dropout_scale (LoHa always does)."""
    check_dropouts("lokr", jpeft.LoKrConfig, {(): False, (("rank_dropout_scale", True),): True})


# ---------------------------------------------------------------------------------------------
# PEFT's fallbacks and jpeft's refusals


@pytest.mark.parametrize("factor", [3, 0, -5, 64])
def test_non_dividing_decompose_factor_falls_back_as_peft(base_of, factor):
    """PEFT does not reject a decompose_factor that does not divide a dimension: it searches the
    divisors up to it (none for factor <= 0 but -1: a [1, 1] w1). jpeft builds the same pieces."""
    base = base_of("llama")
    kwargs = dict(r=2, decompose_factor=factor, target_modules=["k_proj", "up_proj"])
    peft_model = peft.get_peft_model(load_hf(base.path), peft.LoKrConfig(**kwargs))
    theirs = {
        name.replace("base_model.model.", "").replace(".default", ""): tuple(p.shape)
        for name, p in peft_model.named_parameters()
        if ".lokr_" in name
    }
    adapter = jpeft.init_adapter(base.params, jpeft.LoKrConfig(**kwargs), key=jax.random.key(0))
    ours = {
        f"{m}.{p}": tuple(v.shape)
        for m, pieces in adapter.weights.items()
        for p, v in pieces.items()
    }
    assert ours == theirs


def test_stacked_layers_with_different_pieces_are_refused(base_of, tmp_path):
    """r=8 makes q_proj's w2 full in layer 1 but factored (r=2) in the others: PEFT builds it,
    jpeft (which runs a module's stacked layers as one op) refuses it, naming the module."""
    base = base_of("llama")
    kwargs = dict(r=2, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 8})
    message = r"model\.layers\.self_attn\.q_proj: its layers have different LoKr pieces"
    with pytest.raises(ValueError, match=message):
        jpeft.init_adapter(base.params, jpeft.LoKrConfig(**kwargs), key=jax.random.key(0))
    peft.get_peft_model(load_hf(base.path), peft.LoKrConfig(**kwargs)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        jpeft.load_pretrained(tmp_path)


def test_four_bit_base_is_refused(base_of):
    base = base_of("llama")
    quantized = quantize_params(base.params)
    config = jpeft.LoKrConfig(r=2, target_modules=["v_proj"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj.*4-bit"):
        jpeft.init_adapter(quantized, config, key=jax.random.key(0))
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0))
    with pytest.raises(ValueError, match="LoKr cannot adapt .*4-bit quantized"):
        base.logits(quantized, adapter)


def test_embedding_target_is_refused(base_of):
    base = base_of("llama")
    with pytest.raises(TypeError, match="Embedding"):
        peft.get_peft_model(load_hf(base.path), peft.LoKrConfig(target_modules=["embed_tokens"]))
    config = jpeft.LoKrConfig(target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="model.embed_tokens is an embedding layer"):
        jpeft.init_adapter(base.params, config, key=jax.random.key(0))


def test_init_weights_must_be_peft_values():
    with pytest.raises(ValueError, match="init_weights must be True, False or 'lycoris'"):
        jpeft.LoKrConfig(init_weights="gaussian")
