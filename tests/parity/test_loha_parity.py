"""LoHa against PyTorch PEFT, both directions, on tiny random Llama and Qwen2 models.

For each family and config: a PEFT adapter with every piece perturbed away from its init (and a
modules_to_save copy) loaded by jpeft gives PEFT's logits, merged or not; jpeft's own adapter,
perturbed, saved by jpeft and loaded by `PeftModel.from_pretrained` gives jpeft's logits; the
saved keys, shapes and adapter_config.json equal those PEFT writes for the same config. Dropouts
cannot be compared across frameworks (different random streams), so their deterministic
properties are checked on one node. The two-way checks are `two_way.py`'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from hf_bases import load_hf
from two_way import TOL, two_way_tests

import jpeft
from jpeft.ops import dense
from jpeft.quant import quantize_params

FAMILIES = ("llama", "qwen2")
CONFIGS = {
    "defaults": {},
    "explicit": dict(
        r=4,
        alpha=16,
        target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
        init_weights=False,
    ),
    "patterns": dict(
        r=4,
        alpha=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 6, "model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={"q_proj": 3},
    ),
    "layers_dropout": dict(
        r=4,
        target_modules=["v_proj", "gate_proj"],
        layers_to_transform=[0, 2],
        rank_dropout=0.3,
        module_dropout=0.2,
    ),
    "regex_save": dict(
        r=2,
        target_modules=r".*\.(o|up)_proj",
        exclude_modules=["model.layers.1.mlp.up_proj"],
        modules_to_save=["lm_head"],
    ),
}
CASES = [(family, name) for family in FAMILIES for name in CONFIGS]
test_peft_adapter_loads_in_jpeft, test_jpeft_adapter_loads_in_peft = two_way_tests(
    "LoHaConfig", CONFIGS, CASES
)


# ---------------------------------------------------------------------------------------------
# dropouts: deterministic properties on one node


def node_delta(name: str, config, key) -> tuple[np.ndarray, np.ndarray]:
    """(x dW^T with `key`, without dropout) [2, 5, out] for one random module [out=24, in=10]."""
    method = jpeft.registered()[name]
    rng = np.random.default_rng(0)
    base_w = jnp.asarray(rng.standard_normal((24, 10), np.float32))
    shapes = method.layout(config, "m", (24, 10))
    pieces = {p: jnp.asarray(rng.standard_normal(s, np.float32)) for p, s in shapes.items()}
    constants = {"scaling": jnp.float32(config.alpha / config.r)}
    x = jnp.asarray(rng.standard_normal((2, 5, 10), np.float32))

    def delta(key):
        node = method.make_node(base_w, pieces, {}, constants, None, key, config)
        return np.asarray(node.linear(x, None) - dense(x, base_w))

    return delta(key), delta(None)


def row_factors(dropped: np.ndarray, full: np.ndarray) -> np.ndarray:
    """The factor each output row of dW was multiplied by: [out]."""
    ratio = dropped.reshape(-1, dropped.shape[-1]) / full.reshape(-1, full.shape[-1])
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:1], ratio.shape), rtol=1e-4)
    return ratio[0]


def check_dropouts(name: str, config_class, renormalised: dict) -> None:
    """No key: exactly the dropout-free output. With a key: module dropout gives all or nothing;
    rank dropout zeroes whole output rows and scales the kept ones by out / kept (when
    renormalised) or 1."""
    plain = config_class(r=2, alpha=4)
    _, reference = node_delta(name, plain, None)
    for fields, renormalise in renormalised.items():
        config = plain.replace(rank_dropout=0.5, module_dropout=0.4, **dict(fields))
        no_key, full = node_delta(name, config, None)
        np.testing.assert_array_equal(no_key, reference)
        np.testing.assert_array_equal(full, reference)
        skipped = kept_rows = 0
        for seed in range(12):
            dropped, _ = node_delta(name, config, jax.random.key(seed))
            assert dropped.shape == full.shape
            if not dropped.any():
                skipped += 1
                continue
            factors = row_factors(dropped, full)
            kept = factors != 0
            scale = len(factors) / kept.sum() if renormalise else 1.0
            np.testing.assert_allclose(factors[kept], scale, rtol=1e-4)
            kept_rows += kept.sum()
        assert 0 < skipped < 12, "module dropout 0.4 never / always skipped the adapter"
        assert 0 < kept_rows < 24 * (12 - skipped), "rank dropout kept all / no rows"


def test_dropouts_are_training_only_and_mask_rows():
    check_dropouts("loha", jpeft.LoHaConfig, {(): True})


def test_dropouts_in_the_model_need_a_key(base_of):
    """Through the model: no dropout key gives the dropout-free logits; a key changes them."""
    base = base_of("llama")
    kwargs = dict(r=4, target_modules=["q_proj", "up_proj"], init_weights=False)
    plain = jpeft.init_adapter(base.params, jpeft.LoHaConfig(**kwargs), key=jax.random.key(0))
    dropping = plain.replace(config=plain.config.replace(rank_dropout=0.5, module_dropout=0.5))
    expected = base.logits(base.params, plain)
    np.testing.assert_array_equal(base.logits(base.params, dropping), expected)
    ids = jnp.asarray(base.ids)
    trained = base._apply(base.params, ids, adapter=dropping, dropout_key=jax.random.key(1))
    assert np.asarray(trained).shape == expected.shape
    assert np.abs(np.asarray(trained) - expected).max() > 100 * TOL


# ---------------------------------------------------------------------------------------------
# refusals, as PEFT


def test_four_bit_base_is_refused(base_of, tmp_path):
    base = base_of("llama")
    quantized = quantize_params(base.params)
    config = jpeft.LoHaConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*4-bit"):
        jpeft.init_adapter(quantized, config, key=jax.random.key(0))
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0))
    with pytest.raises(ValueError, match="LoHa cannot adapt .*4-bit quantized"):
        base.model.apply(quantized, jnp.asarray(base.ids), adapter=adapter)


def test_embedding_target_is_refused(base_of):
    base = base_of("llama")
    with pytest.raises(TypeError, match="Embedding"):
        peft.get_peft_model(load_hf(base.path), peft.LoHaConfig(target_modules=["embed_tokens"]))
    config = jpeft.LoHaConfig(target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match="model.embed_tokens is an embedding layer"):
        jpeft.init_adapter(base.params, config, key=jax.random.key(0))


def test_loaded_pieces_must_fit_the_config(base_of, tmp_path):
    """A file whose ranks disagree with its config (PEFT would fail to load it) is refused with
    the module named."""
    base = base_of("llama")
    config = jpeft.LoHaConfig(r=4, target_modules=["q_proj"])
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0))
    jpeft.save_pretrained(adapter.replace(config=config.replace(r=2)), tmp_path)
    with pytest.raises(ValueError, match=r"q_proj\.hada_w1_a has shape \(32, 4\)"):
        jpeft.load_pretrained(tmp_path)
