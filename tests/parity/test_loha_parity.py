"""LoHa against PyTorch PEFT, both directions, on tiny random Llama and Qwen2 models.

For each family and config: a PEFT adapter with every piece perturbed away from its init (and a
modules_to_save copy) loaded by jpeft gives PEFT's logits, merged or not; jpeft's own adapter,
perturbed, saved by jpeft and loaded by `PeftModel.from_pretrained` gives jpeft's logits; the
saved keys, shapes and adapter_config.json equal those PEFT writes for the same config. Dropouts
cannot be compared across frameworks (different random streams), so their deterministic
properties are checked on one node. The helpers here are shared with test_lokr_parity.py.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from hf_bases import build_base, load_hf, perturb_torch, torch_logits
from safetensors.numpy import load_file

import jpeft
from jpeft.method import method_for
from jpeft.ops import dense
from jpeft.quant import quantize_params

TOL = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0}
FAMILIES = ("llama", "qwen2")
WEIGHTS = "adapter_model.safetensors"
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


class Base:
    """A tiny checkpoint, its jpeft model (apply jitted with XLA's backend optimizations off:
    one quick compile per adapter layout) and the base logits."""

    def __init__(self, path, model, params, ids):
        self.path, self.model, self.params, self.ids = path, model, params, ids
        self._apply = jax.jit(model.apply, compiler_options=FAST_COMPILE)
        self.base_logits = self.logits(params)

    def logits(self, params, adapter=None) -> np.ndarray:
        return np.asarray(self._apply(params, jnp.asarray(self.ids), adapter=adapter))

    def common(self) -> dict:
        """Config fields PEFT fills in for a causal LM saved from this checkpoint."""
        return dict(task_type="CAUSAL_LM", base_model_name_or_path=str(self.path))

    def assert_changed(self, logits) -> None:
        """The perturbed adapter must move the logits well beyond the tolerance."""
        assert np.abs(logits - self.base_logits).max() > 100 * TOL


@pytest.fixture(scope="module")
def base_of(tmp_path_factory):
    """family -> Base, built once per family."""
    cache = {}

    def build(family: str) -> Base:
        if family not in cache:
            cache[family] = Base(*build_base(family, tmp_path_factory.mktemp(family)))
        return cache[family]

    return build


def perturb_jax(adapter: jpeft.Adapter) -> jpeft.Adapter:
    """Every trainable leaf moved by 0.05 N(0, 1) noise (numpy's, so nothing compiles)."""
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), adapter)


def check_peft_adapter_loads(base: Base, peft_config, directory) -> None:
    """PEFT's perturbed adapter, saved by PEFT, gives PEFT's logits in jpeft, merged or not."""
    peft_model = peft.get_peft_model(load_hf(base.path), peft_config)
    perturb_torch(peft_model)
    expected = torch_logits(peft_model.eval(), base.ids)
    peft_model.save_pretrained(directory)

    adapter = jpeft.load_pretrained(directory)
    got = base.logits(base.params, adapter)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    base.assert_changed(got)
    merged = base.logits(jpeft.merge(base.params, adapter))
    np.testing.assert_allclose(merged, expected, atol=TOL, rtol=0)


def check_jpeft_adapter_loads(base: Base, config, peft_config, directory) -> None:
    """jpeft's perturbed adapter, saved by jpeft, gives jpeft's logits in PEFT; the files hold
    the keys, shapes and config PEFT writes for the same config."""
    fresh = jpeft.init_adapter(base.params, config, key=jax.random.key(0), model=base.model)
    adapter = perturb_jax(fresh)
    jpeft.save_pretrained(adapter, directory / "jpeft")
    expected = base.logits(base.params, adapter)
    base.assert_changed(expected)

    loaded = peft.PeftModel.from_pretrained(load_hf(base.path), directory / "jpeft").eval()
    np.testing.assert_allclose(torch_logits(loaded, base.ids), expected, atol=TOL, rtol=0)

    peft.get_peft_model(load_hf(base.path), peft_config).save_pretrained(directory / "peft")
    ours, theirs = (load_file(directory / d / WEIGHTS) for d in ("jpeft", "peft"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert {v.dtype for v in ours.values()} == {np.dtype(np.float32)}
    check_init_like_peft(method_for(config).to_file(fresh)[1], theirs)
    ours, theirs = (saved_config(directory / d) for d in ("jpeft", "peft"))
    if config.target_modules == "all-linear":
        # PEFT saves the names "all-linear" resolved to (which it resolves again on load); the
        # modules themselves are compared through the keys above.
        assert ours.pop("target_modules") == "all-linear" and theirs.pop("target_modules")
    assert ours == theirs


def check_init_like_peft(ours: dict, theirs: dict) -> None:
    """Fresh pieces as PEFT's: the same ones zero, the others kaiming_uniform(a=sqrt(5)), i.e.
    U(+-1/sqrt(fan_in)) with fan_in the second dim (values near the bound, none beyond)."""
    for key, theirs_value in theirs.items():
        if ".hada_" not in key and ".lokr_" not in key:
            continue
        ours_value = np.asarray(ours[key])
        assert (ours_value == 0).all() == (theirs_value == 0).all(), key
        bound = 1 / np.sqrt(theirs_value.shape[1])
        for value in (ours_value, theirs_value):
            assert np.abs(value).max() <= bound * (1 + 1e-6), key
        if ours_value.any() and ours_value.size >= 16:
            assert np.abs(ours_value).max() > 0.5 * bound, key


def saved_config(directory) -> dict:
    """adapter_config.json with PEFT's sets (saved in any order) sorted."""
    data = json.loads((directory / "adapter_config.json").read_text())
    for key in ("target_modules", "exclude_modules"):
        if isinstance(data[key], list):
            data[key] = sorted(data[key])
    return data


@pytest.mark.parametrize("family, name", CASES)
def test_peft_adapter_loads_in_jpeft(base_of, family, name, tmp_path):
    base = base_of(family)
    config = peft.LoHaConfig(**CONFIGS[name], **base.common())
    check_peft_adapter_loads(base, config, tmp_path)


@pytest.mark.parametrize("family, name", CASES)
def test_jpeft_adapter_loads_in_peft(base_of, family, name, tmp_path):
    base = base_of(family)
    kwargs = dict(**CONFIGS[name], **base.common())
    check_jpeft_adapter_loads(base, jpeft.LoHaConfig(**kwargs), peft.LoHaConfig(**kwargs), tmp_path)


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
