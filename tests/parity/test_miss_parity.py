"""MiSS against PyTorch PEFT, both directions, on tiny random Llama and Qwen2 models.

As test_loha_parity.py (with `two_way.py`'s checks): PEFT's perturbed adapter loads in jpeft with
PEFT's logits, merged or not; jpeft's perturbed adapter loads in PEFT with jpeft's logits; saved
keys, shapes and adapter_config.json equal PEFT's. Every `init_weights` variant is covered:
balance (True; r dividing in, and r=5 leaving a remainder chunk), False (kaiming start), "bat"
(the weight-dependent update) and "mini". Merged and unmerged weights equal PEFT's
`merge_adapter` / `unmerge_adapter` per module, bat's inverse included. On these sizes (hidden 32,
intermediate 48, k/v 16) r=4 divides every in and out feature count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hf_bases import load_hf, perturb_torch
from two_way import two_way_tests

import jpeft
from jpeft import tree as jtree
from jpeft.quant import dequantize, quantize

CONFIGS = {
    "balance": dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "remainder_layers_save": dict(
        r=5,
        target_modules=["q_proj", "o_proj", "up_proj"],
        layers_to_transform=[0, 2],
        miss_dropout=0.1,
        modules_to_save=["lm_head"],
    ),
    "random": dict(
        r=8,
        init_weights=False,
        target_modules=r".*\.(k|gate)_proj",
        exclude_modules=["model.layers.1.mlp.gate_proj"],
    ),
    "bat": dict(
        r=4, init_weights="bat", target_modules=["q_proj", "k_proj", "up_proj", "down_proj"]
    ),
    "mini": dict(r=6, init_weights="mini", mini_r=4, target_modules="all-linear", bias="all"),
}
CASES = [("llama", name) for name in CONFIGS if name != "balance"]
CASES += [("qwen2", name) for name in ("balance", "bat")]


test_peft_adapter_loads_in_jpeft, test_jpeft_adapter_loads_in_peft = two_way_tests(
    "MissConfig", CONFIGS, CASES
)


@pytest.mark.parametrize("name", CONFIGS)
def test_init_is_peft_s(base_of, name):
    """Fresh blocks: zeros where PEFT's are, else U(+-1/sqrt(out)) over [r, out] as PEFT's."""
    base = base_of("llama")
    config = jpeft.MissConfig(**CONFIGS[name])
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0), model=base.model)
    theirs = peft.get_peft_model(load_hf(base.path), peft.MissConfig(**CONFIGS[name]))
    blocks = {n: p.detach().numpy() for n, p in theirs.named_parameters() if "miss_block" in n}
    assert len(blocks) == len(adapter.weights)
    for module, pieces in adapter.weights.items():
        ours = np.asarray(pieces["miss_block"])
        peft_block = next(v for n, v in blocks.items() if f".{module}.miss_block" in n)
        assert ours.shape == peft_block.shape, module
        assert (ours == 0).all() == (peft_block == 0).all(), module
        if ours.any():
            bound = 1 / np.sqrt(ours.shape[1])
            assert bound / 2 < np.abs(ours).max() <= bound * (1 + 1e-6), module


def weight_of(params, name: str) -> np.ndarray:
    """The HF parameter `name` ([out, in]) of a jpeft param tree."""
    tree_path, layer = jtree.hf_param_path(params, name)
    return np.asarray(jtree.layer_of(jtree.get_path(params, tree_path), layer))


def peft_weight(model, name: str) -> np.ndarray:
    """The base weight `name` ("<module>.weight") of a PEFT model's targeted module."""
    base_name = name.replace(".weight", ".base_layer.weight")
    return model.base_model.model.get_parameter(base_name).numpy()


@pytest.mark.parametrize("name", ["balance", "remainder_layers_save", "bat", "mini"])
def test_merge_and_unmerge_weights_equal_peft_s(base_of, name, tmp_path):
    """PEFT's merge_adapter / unmerge_adapter weights, per targeted module, equal jpeft's merge
    and unmerge of the same (perturbed) adapter; unmerging gives the original weights back."""
    base = base_of("llama")
    model = peft.get_peft_model(load_hf(base.path), peft.MissConfig(**CONFIGS[name]))
    perturb_torch(model)
    model.save_pretrained(tmp_path)
    adapter = jpeft.load_pretrained(tmp_path)
    merged = jpeft.merge(base.params, adapter)
    unmerged = jpeft.unmerge(merged, adapter)
    names = [f"{module}.weight" for module in adapter.weights]
    with torch.no_grad():
        model.merge_adapter()
        peft_merged = {n: peft_weight(model, n).copy() for n in names}
        model.unmerge_adapter()
        peft_unmerged = {n: peft_weight(model, n) for n in names}
    for n in names:
        np.testing.assert_allclose(weight_of(merged, n), peft_merged[n], atol=1e-5, err_msg=n)
        assert np.abs(peft_merged[n] - weight_of(base.params, n)).max() > 1e-3, n
        np.testing.assert_allclose(weight_of(unmerged, n), peft_unmerged[n], atol=1e-5, err_msg=n)
        np.testing.assert_allclose(weight_of(unmerged, n), weight_of(base.params, n), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# one node: dropout (whose random stream differs from torch's) and 4-bit bases

VARIANTS = {"balance": (True, (4, 24)), "mini": ("mini", (4, 4)), "bat": ("bat", (6, 4, 4))}


def node(init, block_shape, base=None, **fields):
    """(a MiSS node on a random weight [out=24, in=12] or `base`, input x [2, 5, 12])."""
    method = jpeft.registered()["miss"]
    rng = np.random.default_rng(0)
    weight = jnp.asarray(rng.standard_normal((24, 12), np.float32)) if base is None else base
    pieces = {"miss_block": jnp.asarray(0.1 * rng.standard_normal(block_shape, np.float32))}
    config = jpeft.MissConfig(r=4, mini_r=4, init_weights=init, **fields)
    x = jnp.asarray(rng.standard_normal((2, 5, 12), np.float32))
    make = method.make_node
    return (lambda key: make(weight, pieces, {}, {}, None, key, config)), x


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_is_training_only_and_not_in_bat(variant):
    """No key: the dropout-free output; a key drops input features of balance and mini (so the
    change is a dropped, rescaled x times the same dW), never bat's (PEFT's bat has no dropout)."""
    init, shape = VARIANTS[variant]
    make, x = node(init, shape, miss_dropout=0.5)
    plain, _ = node(init, shape)
    expected = np.asarray(plain(None).linear(x, None))
    np.testing.assert_array_equal(np.asarray(make(None).linear(x, None)), expected)
    dropped = np.asarray(make(jax.random.key(1)).linear(x, None))
    if variant == "bat":
        np.testing.assert_array_equal(dropped, expected)
        return
    weight = make(None)
    base_y = np.asarray(x) @ np.asarray(weight.base).T
    change = np.asarray(dropped) - base_y
    keep = np.asarray(jax.random.bernoulli(jax.random.key(1), 0.5, x.shape))
    dropped_x = np.where(keep, np.asarray(x) / 0.5, 0)
    np.testing.assert_allclose(change, dropped_x @ np.asarray(weight.delta()).T, atol=1e-5)
    assert np.abs(dropped - expected).max() > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_four_bit_base_equals_its_dequantized_weight(variant):
    """PEFT runs MiSS on quantized linears through its backends: on a 4-bit weight, the node
    gives what it gives on the dequantized weight (bat dequantizes W for its update)."""
    init, shape = VARIANTS[variant]
    weight = jnp.asarray(np.random.default_rng(5).standard_normal((24, 12), np.float32))
    quantized = quantize(weight)
    on_4bit, x = node(init, shape, base=quantized)
    on_float, _ = node(init, shape, base=dequantize(quantized, jnp.float32))
    np.testing.assert_allclose(
        np.asarray(on_4bit(None).linear(x, None)),
        np.asarray(on_float(None).linear(x, None)),
        atol=1e-4,
    )


# ---------------------------------------------------------------------------------------------
# refusals and 4-bit bases, as PEFT


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(r=40, target_modules=["q_proj"]), r"q_proj .*r=40 exceeds its in_features 32"),
        (
            dict(r=3, init_weights="bat", target_modules=["q_proj"]),
            r"q_proj .*'bat' needs in and out features divisible by r=3",
        ),
        (
            dict(r=4, init_weights="mini", mini_r=5, target_modules=["q_proj"]),
            r"q_proj .*'mini' needs out_features divisible by mini_r=5",
        ),
    ],
)
def test_modules_peft_refuses_are_refused(base_of, fields, message, tmp_path):
    """Refused at init and at load (a file written for a wider model), naming the module."""
    base = base_of("llama")
    with pytest.raises(ValueError):
        peft.get_peft_model(load_hf(base.path), peft.MissConfig(**fields))
    with pytest.raises(ValueError, match=message):
        jpeft.init_adapter(base.params, jpeft.MissConfig(**fields), key=jax.random.key(0))
    fine = jpeft.init_adapter(
        base.params, jpeft.MissConfig(r=2, target_modules=["q_proj"]), key=jax.random.key(0)
    )
    with pytest.raises(ValueError, match=message):
        base.logits(base.params, fine.replace(config=jpeft.MissConfig(**fields)))


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(init_weights="balance"), "init_weights"),
        (dict(bias="lora_only"), "bias"),
        (dict(miss_dropout=1.0), "miss_dropout"),
        (dict(init_weights="mini", mini_r=0), "mini_r"),
        (dict(r=0), r"\br\b"),
        (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform"),
    ],
)
def test_bad_config_values_name_the_field(fields, field):
    with pytest.raises(ValueError, match=field):
        jpeft.MissConfig(**fields)
