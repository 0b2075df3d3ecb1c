"""OFT against PyTorch PEFT 0.21.2, both directions, on tiny random Llama and Qwen2 models.

As test_loha_parity.py (with `two_way.py`'s checks): PEFT's perturbed adapter loads in jpeft with
PEFT's logits, merged or not; jpeft's perturbed adapter loads in PEFT with jpeft's logits; saved
keys, shapes and adapter_config.json equal PEFT's. The configs cover both ways of sizing blocks
(r, oft_block_size) including sizes PEFT moves to a divisor of in_features (hidden 32,
intermediate 48), both Cayley parametrisations (they differ by a transpose, so swapping them
fails here), short Neumann series, block_share and COFT. Merge and unmerge are compared weight by
weight with PEFT's `merge_adapter` / `unmerge_adapter`; old PEFT files are refused as PEFT does.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
from hf_bases import load_hf, perturb_torch
from safetensors.numpy import save_file
from two_way import Base, check_merge_like_peft, hf_weight, two_way_tests

import jpeft
from jpeft.methods.oft import nearest_divisor
from jpeft.quant import quantize_params

CONFIGS = {
    "defaults": {},  # oft_block_size 32: one block on hidden 32, Neumann, 5 terms
    "r_exact_layers": dict(
        r=4,
        oft_block_size=0,
        target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
        layers_to_transform=[0, 2],
        use_cayley_neumann=False,
        init_weights=False,
        module_dropout=0.3,  # inert in PEFT 0.21.2
    ),
    "block_share_short_series": dict(
        oft_block_size=5,  # -> 4 on 32 and on 48 (a tie between 4 and 6 goes to the lower)
        block_share=True,
        num_cayley_neumann_terms=3,
        target_modules=["o_proj", "gate_proj", "down_proj"],
    ),
    "coft_r_adjusted_save": dict(
        r=5,  # -> 4 blocks on 32 (of 8) and on 48 (of 12)
        oft_block_size=0,
        coft=True,
        eps=0.5,  # radius 0.25 per block: the perturbed blocks (||Q|| ~ 0.4-0.6) are projected
        target_modules=r".*\.(q|up|down)_proj",
        exclude_modules=["model.layers.1.mlp.up_proj"],
        modules_to_save=["lm_head"],
        bias="oft_only",
    ),
}
# Every config on Llama; Qwen2 (q/k/v biases) on two.
CASES = [("llama", name) for name in CONFIGS] + [
    ("qwen2", "defaults"),
    ("qwen2", "coft_r_adjusted_save"),
]
MODULE = "model.layers.0.mlp.down_proj"  # in_features 48: the merge/unmerge checks' module


# PEFT warns when it adjusts a block size, and that fan_in_fan_out has no effect
test_peft_adapter_loads_in_jpeft, test_jpeft_adapter_loads_in_peft = (
    pytest.mark.filterwarnings("ignore:.*(Invalid|adjusted|no effect).*")(test)
    for test in two_way_tests("OFTConfig", CONFIGS, CASES)
)


@pytest.mark.filterwarnings("ignore:.*(Invalid|adjusted|no effect).*")
@pytest.mark.parametrize(
    "name", ["r_exact_layers", "block_share_short_series", "coft_r_adjusted_save"]
)
def test_merge_and_unmerge_match_peft(base_of, name, tmp_path):
    """PEFT's merged weight W R_bd^T and its unmerge (by R's inverse) equal jpeft's."""
    base = base_of("llama")
    config = dict(CONFIGS[name], target_modules=["down_proj"], exclude_modules=None)
    peft_model = peft.get_peft_model(load_hf(base.path), peft.OFTConfig(**config))
    perturb_torch(peft_model)
    peft_model.save_pretrained(tmp_path)
    adapter = jpeft.load_pretrained(tmp_path)
    check_merge_like_peft(base, peft_model, adapter, MODULE)


def test_cayley_branches_are_transposes_as_in_peft(base_of):
    """The Neumann series approximates the transpose of the exact Cayley branch: a small skew
    block gives rotations close to each other's transposes and far from each other."""
    base = base_of("llama")
    kwargs = dict(r=4, oft_block_size=0, target_modules=["q_proj"], init_weights=False)
    drawn = jpeft.init_adapter(base.params, jpeft.OFTConfig(**kwargs), key=jax.random.key(0))
    neumann = jax.tree.map(lambda x: 0.1 * x, drawn)  # ||Q|| ~ 0.07: the series' error ~ 1e-6
    exact = neumann.replace(config=neumann.config.replace(use_cayley_neumann=False))
    name = "model.layers.0.self_attn.q_proj.weight"
    w_neumann, w_exact = (hf_weight(jpeft.merge(base.params, a), name) for a in (neumann, exact))
    w = hf_weight(base.params, name)
    assert np.abs(w_neumann - w_exact).max() > 1e-2
    # W R^T per block: the transposed branch is W R applied through the inverse (R orthogonal)
    inverse = hf_weight(jpeft.unmerge(base.params, exact), name)
    assert np.abs(w_neumann - inverse).max() < 0.05 * np.abs(w_neumann - w).max()


@pytest.mark.parametrize("in_features, value", [(32, 5), (48, 5), (48, 7), (32, 40), (48, 1)])
def test_block_adjustment_matches_peft(in_features, value):
    layer = peft.tuners.oft.layer.OFTLayer.__new__(peft.tuners.oft.layer.OFTLayer)
    assert nearest_divisor(in_features, value) == layer.adjust_oft_parameters(in_features, value)


def test_init_matches_peft(base_of):
    """Zeros (R = I) by default; init_weights=False draws N(0, 0.1) as PEFT."""
    base = base_of("llama")
    for init in (True, False):
        config = dict(r=2, oft_block_size=0, target_modules=["up_proj"], init_weights=init)
        ours = jpeft.init_adapter(base.params, jpeft.OFTConfig(**config), key=jax.random.key(0))
        peft_model = peft.get_peft_model(load_hf(base.path), peft.OFTConfig(**config))
        theirs = peft_model.base_model.model.model.layers[0].mlp.up_proj.oft_R["default"].weight
        piece = np.asarray(ours.weights["model.layers.0.mlp.up_proj"]["oft_R.weight"])
        assert piece.shape == tuple(theirs.shape) == (2, 120)
        assert (piece == 0).all() == (theirs == 0).all().item() == init
        if not init:
            assert 0.08 < piece.std() < 0.12 and 0.08 < theirs.std().item() < 0.12


def test_coft_optimizer_steps_from_the_projected_value(base_of):
    """PEFT's forward copies the projection into the parameter before the optimizer steps: with
    plain SGD, new = P(old) - lr * grad."""
    base = base_of("llama")
    config = jpeft.OFTConfig(r=2, oft_block_size=0, target_modules=["q_proj"], coft=True, eps=0.1)
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0))
    adapter = jax.tree.map(lambda x: x + 1.0, adapter)  # far outside the ball
    grads = jax.tree.map(jnp.ones_like, adapter)
    optimizer = jpeft.registered()["oft"].wrap_optimizer(config, optax.sgd(0.5))
    updates, _ = optimizer.update(grads, optimizer.init(adapter), adapter)
    stepped = optax.apply_updates(adapter, updates)
    piece = np.asarray(stepped.weights["model.layers.0.self_attn.q_proj"]["oft_R.weight"])
    # each row is 1.0 * 120 entries, ||Q|| = sqrt(2 * 120): scaled to radius 0.1 / sqrt(2)
    projected = (0.1 / np.sqrt(2)) / np.sqrt(240)
    np.testing.assert_allclose(piece, projected - 0.5, rtol=1e-5)


def test_four_bit_base_rotates_the_input(base_of):
    """A 4-bit base works as PEFT's quantized OFT layers: the same logits as the dequantized
    base with the adapter, up to the 4-bit matmul's rounding."""
    base = base_of("llama")
    config = jpeft.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj", "up_proj"])
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0), model=base.model)
    adapter = jax.tree.map(lambda x: x + 0.05, adapter)
    quantized = quantize_params(base.params)
    got = base.logits(quantized, adapter)
    expected = base.logits(jpeft.merge(quantized, adapter))
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)
    assert np.abs(got - base.logits(quantized)).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# refusals, as PEFT


def test_r_and_block_size_exactly_one(base_of):
    for kwargs in (dict(r=4), dict(r=0, oft_block_size=0)):
        with pytest.raises(ValueError, match="r or oft_block_size|r .* oft_block_size"):
            peft.OFTConfig(**kwargs)
        with pytest.raises(ValueError, match=r"exactly one of r \(\d+\) and oft_block_size"):
            jpeft.OFTConfig(**kwargs)
    with pytest.raises(ValueError, match="OFTConfig.r must be >= 0, got -2"):
        jpeft.OFTConfig(r=-2, oft_block_size=0)


def saved_adapter(base: Base, directory, **config) -> None:
    adapter = jpeft.init_adapter(
        base.params, jpeft.OFTConfig(target_modules=["q_proj"], **config), key=jax.random.key(0)
    )
    jpeft.save_pretrained(adapter, directory)


def test_pre_014_config_is_refused(base_of, tmp_path):
    """PEFT <= 0.13 wrote no oft_block_size: PEFT 0.21.2 refuses the config, jpeft too."""
    saved_adapter(base_of("llama"), tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["oft_block_size"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="OFT has been updated since PEFT 0.14.0"):
        peft.OFTConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="adapter_config.json.*without 'oft_block_size'.*<= 0.13"):
        jpeft.load_pretrained(tmp_path)


def test_014_015_tensors_are_refused(base_of, tmp_path):
    """PEFT 0.14-0.15 saved oft_r [r, b, b] and oft_s [out, 1]. PEFT 0.21.2 means to refuse them
    (`.oft_r.` in a key raises), but the saved key ends in `.oft_r`, so it loads an identity
    adapter with a missing-keys warning; jpeft refuses the file, with PEFT's reason."""
    base = base_of("llama")
    saved_adapter(base, tmp_path, r=4, oft_block_size=0)
    path = tmp_path / "adapter_model.safetensors"
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.oft_r": np.zeros((4, 8, 8), np.float32),
        f"{prefix}.oft_s": np.ones((32, 1), np.float32),
    }
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"missing adapter keys.*q_proj\.oft_R"):
        peft.PeftModel.from_pretrained(load_hf(base.path), tmp_path)
    with pytest.raises(ValueError, match=r"q_proj\.oft_r' is from PEFT 0\.14-0\.15.*<= 0\.15\.2"):
        jpeft.load_pretrained(tmp_path)


def test_pre_018_neumann_file_warns_as_peft(base_of, tmp_path):
    """0.16-0.17 files load with today's series and a warning, in PEFT and jpeft; not newer."""
    saved_adapter(base_of("llama"), tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    assert data["use_cayley_neumann"] is True and data["peft_version"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jpeft.load_pretrained(tmp_path)
    assert not [w for w in caught if "0.18" in str(w.message)]
    path.write_text(json.dumps(dict(data, peft_version="0.17.1")))
    with pytest.warns(UserWarning, match="cayley-neumann parameterization has been slightly"):
        peft.OFTConfig.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="PEFT 0.17.1 with use_cayley_neumann=True.*0.18"):
        jpeft.load_pretrained(tmp_path)


def test_loaded_piece_must_fit_the_model(base_of, tmp_path):
    """A file whose block layout does not fit the model's in_features is refused by module."""
    base = base_of("llama")
    saved_adapter(base, tmp_path, r=4, oft_block_size=0)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), r=2)))
    adapter = jpeft.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"q_proj\.oft_R\.weight has shape \(4, 28\)"):
        base.logits(base.params, adapter)
