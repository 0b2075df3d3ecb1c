"""BOFT against PyTorch PEFT 0.21.2, both directions, on tiny random Llama and Qwen2 models.

As test_loha_parity.py (with `two_way.py`'s checks): PEFT's perturbed adapter loads in jpeft with
PEFT's logits, merged or not; jpeft's perturbed adapter loads in PEFT with jpeft's logits; saved
keys, shapes and adapter_config.json equal PEFT's.

PEFT builds more than one butterfly level only with its CUDA extension `fbd_cuda`; on a CPU it
sets the factor to 1 (`update_layer`). So that PEFT's own layer code runs its butterfly levels
here, `fbd_cuda` is replaced by a CPU stand-in (`FakeFbd`: the block-diagonal matrix the CUDA
kernel builds, forward only); one test checks PEFT's real CPU fallback, a one-level file under a
factor-2 config, which jpeft loads as one level.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import torch.utils.cpp_extension
from hf_bases import load_hf, perturb_torch, torch_logits
from peft.tuners.boft import layer as boft_layer
from safetensors.numpy import load_file, save_file
from two_way import (
    WEIGHTS,
    check_merge_like_peft,
    hf_weight,
    perturb_jax,
    two_way_tests,
)

import jpeft
from jpeft.methods.boft import BOFT_R, block_butterfly_perm, block_dropout
from jpeft.quant import quantize_params

CONFIGS = {
    "defaults": {},  # block size 4, one level, q_proj and v_proj
    "num_two_levels": dict(
        boft_block_size=0,
        boft_block_num=4,  # blocks of 8 on in 32, of 12 on in 48
        boft_n_butterfly_factor=2,
        target_modules=["q_proj", "down_proj"],
        layers_to_transform=[0, 2],
        init_weights=False,
    ),
    "three_levels_dropout": dict(
        boft_block_size=2,  # 16 blocks on in 32, 24 on in 48
        boft_n_butterfly_factor=3,
        boft_dropout=0.2,  # training only
        target_modules=["o_proj", "gate_proj", "down_proj"],
    ),
    "regex_save": dict(
        boft_block_size=8,
        boft_n_butterfly_factor=2,
        target_modules=r".*\.(q|up|down)_proj",
        exclude_modules=["model.layers.1.mlp.up_proj"],
        modules_to_save=["lm_head"],
        bias="boft_only",
    ),
}
# Every config on Llama; Qwen2 (q/k/v biases, which BOFT does not scale, one trained) on one.
CASES = [("llama", name) for name in CONFIGS] + [("qwen2", "regex_save")]
MODULE = "model.layers.0.mlp.down_proj"  # in_features 48: the merge/unmerge checks' module
IGNORE = "ignore:.*(boft_n_butterfly_factor|CUDA extension).*"


class FakeFbd:
    """A CPU stand-in for PEFT's `fbd_cuda` kernel: [N, D, H, H] -> ([N, D H, D H],)."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*level) for level in blocks])]


@pytest.fixture(autouse=True)
def fbd_cuda(monkeypatch):
    """PEFT's BOFT with its butterfly levels (the path its CUDA machines take)."""
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", FakeFbd())


test_peft_adapter_loads_in_jpeft, test_jpeft_adapter_loads_in_peft = two_way_tests(
    "BOFTConfig", CONFIGS, CASES
)


@pytest.mark.parametrize("name", ["num_two_levels", "three_levels_dropout"])
def test_merge_and_unmerge_match_peft(base_of, name, tmp_path):
    """PEFT's merged weight (R_tot W^T)^T s and its unmerge equal jpeft's, weight by weight."""
    base = base_of("llama")
    config = dict(CONFIGS[name], target_modules=["down_proj"], layers_to_transform=None)
    peft_model = peft.get_peft_model(load_hf(base.path), peft.BOFTConfig(**config))
    perturb_torch(peft_model)
    peft_model.save_pretrained(tmp_path)
    adapter = jpeft.load_pretrained(tmp_path)
    levels = config.get("boft_n_butterfly_factor", 1)
    assert adapter.weights[MODULE][BOFT_R].shape[0] == levels
    check_merge_like_peft(base, peft_model, adapter, MODULE)


def test_peft_cpu_fallback_file_loads_with_its_one_level(base_of, monkeypatch, tmp_path):
    """Without fbd_cuda, PEFT sets the factor to 1 (warning) but saves the config's factor 2:
    jpeft takes the levels from boft_R and gives PEFT's logits."""
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", None)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no ninja")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    base = base_of("llama")
    config = peft.BOFTConfig(**CONFIGS["regex_save"], **base.common())
    with pytest.warns(UserWarning, match="Setting boft_n_butterfly_factor to 1"):
        peft_model = peft.get_peft_model(load_hf(base.path), config)
    perturb_torch(peft_model)
    expected = torch_logits(peft_model.eval(), base.ids)
    peft_model.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    )
    assert load_file(tmp_path / WEIGHTS)[f"base_model.model.{MODULE}.{BOFT_R}"].shape == (
        1,
        6,
        8,
        8,
    )
    adapter = jpeft.load_pretrained(tmp_path)
    got = base.logits(base.params, adapter)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    base.assert_changed(got)


@pytest.mark.parametrize(
    "n, blocks, half, factor",
    [(32, 8, 2, 1), (32, 4, 2, 1), (48, 12, 1, 2), (48, 6, 1, 2), (64, 2, 4, 3), (24, 4, 3, 0)],
)
def test_butterfly_permutation_matches_peft(n, blocks, half, factor):
    layer = boft_layer.BOFTLayer.__new__(boft_layer.BOFTLayer)
    theirs = layer.block_butterfly_perm(n, blocks, half, factor).numpy()
    np.testing.assert_array_equal(block_butterfly_perm(n, blocks, half, factor), theirs)


def test_init_matches_peft(base_of):
    """R = 0 and s = 1 by default; init_weights=False draws R ~ N(0, 0.1), s ~ N(1, 0.1)."""
    base = base_of("llama")
    module = "model.layers.0.mlp.down_proj"
    for init in (True, False):
        config = dict(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["down_proj"])
        config["init_weights"] = init
        ours = jpeft.init_adapter(base.params, jpeft.BOFTConfig(**config), key=jax.random.key(0))
        peft_model = peft.get_peft_model(load_hf(base.path), peft.BOFTConfig(**config))
        layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
        for piece, torch_piece, center in (
            ("boft_R", layer.boft_R["default"], 0.0),
            ("boft_s", layer.boft_s["default"], 1.0),
        ):
            mine, theirs = np.asarray(ours.weights[module][piece]), torch_piece.detach().numpy()
            assert mine.shape == theirs.shape == {"boft_R": (2, 24, 2, 2), "boft_s": (32, 1)}[piece]
            for value in (mine, theirs):
                assert np.abs(value.mean() - center) < 0.05
                assert (value.std() == 0) if init else (0.07 < value.std() < 0.13)


def test_block_dropout_replaces_blocks_of_one_level():
    """floor(p nb) blocks of exactly one level become I, the others stay, no rescaling."""
    rng = np.random.default_rng(0)
    rotations = jnp.asarray(rng.standard_normal((3, 10, 4, 4), np.float32))
    levels_hit = set()
    for seed in range(8):
        dropped = np.asarray(block_dropout(rotations, jax.random.key(seed), 0.35))
        changed = (dropped != np.asarray(rotations)).any(axis=(-1, -2))  # [levels, nb]
        assert changed.sum() == 3 and len(set(np.nonzero(changed)[0])) == 1
        np.testing.assert_array_equal(dropped[changed], np.broadcast_to(np.eye(4), (3, 4, 4)))
        levels_hit.add(int(np.nonzero(changed)[0][0]))
    assert len(levels_hit) > 1


def test_dropout_only_while_training(base_of):
    """boft_dropout changes the training forward (a dropout key), never the eval one."""
    base = base_of("llama")
    config = jpeft.BOFTConfig(boft_block_size=4, boft_dropout=0.5, target_modules=["q_proj"])
    adapter = perturb_jax(jpeft.init_adapter(base.params, config, key=jax.random.key(0)))
    method = jpeft.registered()["boft"]
    pieces = adapter.weights["model.layers.0.self_attn.q_proj"]
    w = hf_weight(base.params, "model.layers.0.self_attn.q_proj.weight")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32), np.float32))

    def out(key):
        return np.asarray(method.make_node(w, pieces, {}, {}, None, key, config).linear(x, None))

    assert np.abs(out(jax.random.key(1)) - out(None)).max() > 1e-3
    no_dropout = config.replace(boft_dropout=0.0)
    node = method.make_node(w, pieces, {}, {}, None, jax.random.key(1), no_dropout)
    assert node.dropout_key is None


def test_four_bit_base_rotates_the_input(base_of):
    """A 4-bit base works as PEFT's quantized BOFT layers: the same logits as the dequantized
    base with the adapter, up to the 4-bit matmul's rounding."""
    base = base_of("llama")
    config = jpeft.BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "up_proj"]
    )
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0), model=base.model)
    adapter = jax.tree.map(lambda x: x + 0.05, adapter)
    quantized = quantize_params(base.params)
    got = base.logits(quantized, adapter)
    expected = base.logits(jpeft.merge(quantized, adapter))
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)
    assert np.abs(got - base.logits(quantized)).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# refusals, as PEFT


def test_block_size_and_num_exactly_one():
    for kwargs in (dict(boft_block_num=4), dict(boft_block_size=0)):
        with pytest.raises(ValueError, match="boft_block_size .* boft_block_num"):
            peft.BOFTConfig(**kwargs)
        with pytest.raises(ValueError, match=r"exactly one of boft_block_size \(\d+\) and"):
            jpeft.BOFTConfig(**kwargs)
    with pytest.raises(ValueError, match="boft_n_butterfly_factor must be a positive"):
        jpeft.BOFTConfig(boft_n_butterfly_factor=0)


@pytest.mark.parametrize(
    "target, kwargs, problem",
    [
        ("q_proj", dict(boft_block_size=0, boft_block_num=3), "not divisible by boft_block_num"),
        ("q_proj", dict(boft_block_size=5), "not divisible by boft_block_size"),
        (
            "q_proj",
            dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=4),
            "below 2",
        ),
        (
            "down_proj",
            dict(boft_block_size=0, boft_block_num=6, boft_n_butterfly_factor=3),
            "not a multiple of 2",
        ),
        ("q_proj", dict(boft_block_size=32, boft_n_butterfly_factor=2), "boft_block_size x 2"),
        ("down_proj", dict(boft_block_size=3, boft_n_butterfly_factor=2), "even number"),
    ],
)
def test_layouts_peft_refuses_are_refused(base_of, target, kwargs, problem):
    base = base_of("llama")
    config = dict(kwargs, target_modules=[target])
    with pytest.raises(ValueError):
        peft.get_peft_model(load_hf(base.path), peft.BOFTConfig(**config))
    with pytest.raises(ValueError, match=rf"model\.layers\.0\.\w+\.{target}: .*{problem}"):
        jpeft.init_adapter(base.params, jpeft.BOFTConfig(**config), key=jax.random.key(0))


def test_file_with_other_levels_is_refused(base_of, tmp_path):
    """boft_R holds 1 level or the config's factor; 3 under factor 2 is named by module."""
    base = base_of("llama")
    config = jpeft.BOFTConfig(boft_n_butterfly_factor=2, target_modules=["q_proj"])
    jpeft.save_pretrained(jpeft.init_adapter(base.params, config, key=jax.random.key(0)), tmp_path)
    path = tmp_path / WEIGHTS
    tensors = load_file(path)
    key = f"base_model.model.model.layers.0.self_attn.q_proj.{BOFT_R}"
    tensors[key] = np.zeros((3, 8, 4, 4), np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q_proj\.boft_R has shape \(3, 8, 4, 4\).*\(2, "):
        jpeft.load_pretrained(tmp_path)
