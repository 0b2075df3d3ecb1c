"""VeRA against PyTorch PEFT, both directions, on tiny random Llama and Qwen2 models.

For each family and config: PEFT's adapter with its vectors perturbed, saved by PEFT, loads in
jpeft with PEFT's logits, merged or not; jpeft's perturbed adapter, saved by jpeft, loads in PEFT
with jpeft's logits; a fresh jpeft adapter holds PEFT's projections bit for bit and its init; the
saved keys, shapes and adapter_config.json equal PEFT's. `save_projection=False` files (no
projections: both sides draw them again from the key) load both ways. The projections' draw is
checked against torch's own generator on its own.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hf_bases import load_hf, perturb_torch, torch_logits
from peft.tuners.vera.model import _kaiming_init
from safetensors.numpy import load_file
from two_way import TOL, WEIGHTS

import jpeft
from jpeft.adapter import SHARED
from jpeft.methods.torch_random import kaiming_uniform as torch_kaiming_uniform
from jpeft.ops import dense
from jpeft.quant import quantize_params

CONFIGS = {
    "defaults": {},  # r=256 on q_proj, v_proj
    "explicit": dict(
        r=8,
        target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
        projection_prng_key=7,
        d_initial=0.5,
        bias="vera_only",
    ),
    "random_init_layers": dict(
        r=4,
        target_modules=["v_proj", "gate_proj", "o_proj"],
        layers_to_transform=[0, 2],
        init_weights=False,
        vera_dropout=0.1,
        modules_to_save=["lm_head"],
    ),
    "no_projection": dict(
        r=6,
        target_modules=r".*\.(q|down)_proj",
        projection_prng_key=2**40 + 3,
        save_projection=False,
    ),
}
CASES = [("llama", name) for name in CONFIGS]
CASES += [("qwen2", name) for name in ("explicit", "no_projection")]


def perturb_trainable(adapter: jpeft.Adapter) -> jpeft.Adapter:
    """Every trainable leaf moved by 0.05 N(0, 1) noise; the shared projections as they are."""
    trainable, frozen = jpeft.partition(adapter)
    rng = np.random.default_rng(3)
    moved = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), trainable)
    return jpeft.combine(moved, frozen)


@pytest.mark.filterwarnings("ignore:.*save_projection")
@pytest.mark.parametrize("family, name", CASES)
def test_peft_adapter_loads_in_jpeft(base_of, family, name, tmp_path):
    base = base_of(family)
    peft_model = peft.get_peft_model(load_hf(base.path), peft.VeraConfig(**CONFIGS[name]))
    perturb_torch(peft_model)
    expected = torch_logits(peft_model.eval(), base.ids)
    peft_model.save_pretrained(tmp_path)

    adapter = jpeft.load_pretrained(tmp_path, params=base.params)
    got = base.logits(base.params, adapter)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    base.assert_changed(got)
    merged = base.logits(jpeft.merge(base.params, adapter))
    np.testing.assert_allclose(merged, expected, atol=TOL, rtol=0)


@pytest.mark.filterwarnings("ignore:.*save_projection")
@pytest.mark.filterwarnings("ignore:.*PRNG initialisation")
@pytest.mark.parametrize("family, name", CASES)
def test_jpeft_adapter_loads_in_peft(base_of, family, name, tmp_path):
    base = base_of(family)
    kwargs = dict(**CONFIGS[name], **base.common())
    config = jpeft.VeraConfig(**kwargs)
    fresh = jpeft.init_adapter(base.params, config, key=jax.random.key(0), model=base.model)
    adapter = perturb_trainable(fresh)
    jpeft.save_pretrained(adapter, tmp_path / "jpeft")
    expected = base.logits(base.params, adapter)
    base.assert_changed(expected)

    loaded = peft.PeftModel.from_pretrained(load_hf(base.path), tmp_path / "jpeft").eval()
    np.testing.assert_allclose(torch_logits(loaded, base.ids), expected, atol=TOL, rtol=0)

    peft_model = peft.get_peft_model(load_hf(base.path), peft.VeraConfig(**kwargs))
    peft_model.save_pretrained(tmp_path / "peft")
    ours, theirs = (load_file(tmp_path / d / WEIGHTS) for d in ("jpeft", "peft"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert {v.dtype for v in ours.values()} == {np.dtype(np.float32)}
    assert saved_config(tmp_path / "jpeft") == saved_config(tmp_path / "peft")
    check_init_like_peft(fresh, peft_model, config.init_weights)


def saved_config(directory) -> dict:
    """adapter_config.json with PEFT's target_modules set (saved in any order) sorted."""
    data = json.loads((directory / "adapter_config.json").read_text())
    if isinstance(data["target_modules"], list):
        data["target_modules"] = sorted(data["target_modules"])
    return data


def check_init_like_peft(fresh: jpeft.Adapter, peft_model, init_weights: bool) -> None:
    """PEFT's projections bit for bit; its lambdas (zeros and d_initial), or their shapes and
    ones for lambda_b with init_weights=False (lambda_d is torch's global randn)."""
    tuner = peft_model.base_model
    for piece in ("vera_A", "vera_B"):
        theirs = getattr(tuner, piece)["default"].numpy()
        np.testing.assert_array_equal(np.asarray(fresh.frozen[SHARED][piece]), theirs)
    for name, module in peft_model.named_modules():
        if not hasattr(module, "vera_lambda_b") or not module.vera_lambda_b:
            continue
        pieces = fresh.weights[name.removeprefix("base_model.model.")]
        for piece in ("vera_lambda_b", "vera_lambda_d"):
            theirs = getattr(module, piece)["default"].detach().numpy()
            if init_weights or piece == "vera_lambda_b":
                np.testing.assert_array_equal(np.asarray(pieces[piece]), theirs)
            assert pieces[piece].shape == theirs.shape


@pytest.mark.parametrize("seed", [0, 1, 7, 2**31 + 5, 2**32 + 7, 2**63 - 1, -1])
def test_projection_draws_are_torchs_bit_for_bit(seed):
    """PEFT's `_kaiming_init` draws (A then B from one generator) for shapes whose fan-ins and
    sizes differ; a seed's low 32 bits are all mt19937 sees, negatives wrap as in torch."""
    shapes = [(256, 40), (24, 256), (3, 1000), (5, 1)]
    generator = torch.Generator().manual_seed(seed)
    expected = [_kaiming_init(shape, generator=generator).numpy() for shape in shapes]
    got = torch_kaiming_uniform(seed, shapes)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)
    assert np.abs(got[0]).max() <= math.sqrt(6 / 40)


# ---------------------------------------------------------------------------------------------
# the node, dropout, 4-bit base


def node_output(config: jpeft.VeraConfig, key):
    """(node output with `key`, base output) [2, 5, 24] for a module [out=24, in=10] with
    projections for a larger [30, 16] weight."""
    method = jpeft.registered()["vera"]
    rng = np.random.default_rng(0)
    weight = jnp.asarray(rng.standard_normal((24, 10), np.float32))
    drawn = torch_kaiming_uniform(0, [(4, 16), (30, 4)])
    frozen = {k: jnp.asarray(v) for k, v in zip(("vera_A", "vera_B"), drawn, strict=True)}
    pieces = {
        "vera_lambda_b": jnp.asarray(rng.standard_normal(24, np.float32)),
        "vera_lambda_d": jnp.asarray(rng.standard_normal(4, np.float32)),
    }
    x = jnp.asarray(rng.standard_normal((2, 5, 10), np.float32))
    node = method.make_node(weight, pieces, frozen, {}, None, key, config)
    return np.asarray(node.linear(x, None)), np.asarray(dense(x, weight)), node


def test_node_is_the_sliced_math_and_dropout_needs_a_key():
    config = jpeft.VeraConfig(r=4, vera_dropout=0.5)
    out, plain, node = node_output(config, None)
    a, b = np.asarray(node.vera_A), np.asarray(node.vera_B)
    assert a.shape == (4, 10) and b.shape == (24, 4)
    lambda_b, lambda_d = np.asarray(node.lambda_b), np.asarray(node.lambda_d)
    delta = (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)
    np.testing.assert_allclose(np.asarray(node.merged_weight()), node.base + delta, atol=1e-5)
    dropped, _, _ = node_output(config, jax.random.key(1))
    assert np.abs(dropped - out).max() > 1e-3
    assert np.abs(out - plain).max() > 1e-3


def test_four_bit_base_works(base_of):
    """PEFT runs VeRA on bitsandbytes layers (only the base matmul reads the packed weight)."""
    base = base_of("llama")
    quantized = quantize_params(base.params)
    config = jpeft.VeraConfig(r=8, target_modules=["down_proj"])
    adapter = perturb_trainable(jpeft.init_adapter(quantized, config, key=jax.random.key(0)))
    got = base.logits(quantized, adapter)
    np.testing.assert_allclose(base.logits(jpeft.merge(quantized, adapter)), got, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# refusals, as PEFT


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(bias="lora_only"), "bias must be 'none', 'all' or 'vera_only'"),
        (dict(projection_prng_key=2**64), "projection_prng_key must fit"),
        (dict(vera_dropout=1.0), "vera_dropout must be in"),
        (dict(r=0), "r must be a positive integer"),
    ],
)
def test_bad_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        jpeft.VeraConfig(**fields)


def test_embedding_target_is_refused(base_of):
    base = base_of("llama")
    config = jpeft.VeraConfig(target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match="model.embed_tokens is an embedding layer"):
        jpeft.init_adapter(base.params, config, key=jax.random.key(0))


def test_broken_files_are_refused(base_of, tmp_path):
    """A file without the projections its config says it saved, a file without projections and
    no params to draw them for, and projections of another rank or model: each named."""
    base = base_of("llama")
    config = jpeft.VeraConfig(r=4, target_modules=["q_proj", "up_proj"])
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0))
    without = adapter.replace(config=config.replace(save_projection=False))
    jpeft.save_pretrained(without, tmp_path / "without")
    (tmp_path / "without" / "adapter_config.json").write_text(
        (tmp_path / "without" / "adapter_config.json")
        .read_text()
        .replace('"save_projection": false', '"save_projection": true')
    )
    with pytest.raises(ValueError, match=r"save_projection=true, but the file lacks.*vera_A"):
        jpeft.load_pretrained(tmp_path / "without")
    jpeft.save_pretrained(without, tmp_path / "regenerate")
    with pytest.raises(ValueError, match="pass the base params"):
        jpeft.load_pretrained(tmp_path / "regenerate")
    with pytest.warns(UserWarning, match="drawn again from projection_prng_key=0"):
        loaded = jpeft.load_pretrained(tmp_path / "regenerate", params=base.params)
    for piece in ("vera_A", "vera_B"):
        np.testing.assert_array_equal(loaded.frozen[SHARED][piece], adapter.frozen[SHARED][piece])

    jpeft.save_pretrained(adapter.replace(config=config.replace(r=2)), tmp_path / "rank")
    with pytest.raises(ValueError, match=r"_proj\.vera_lambda_d has shape \(4,\)"):
        jpeft.load_pretrained(tmp_path / "rank")
    wide = {**adapter.frozen[SHARED], "vera_A": jnp.zeros((4, 64))}
    jpeft.save_pretrained(adapter.replace(frozen={SHARED: wide}), tmp_path / "wide")
    with pytest.raises(ValueError, match=r"base_model\.vera_A has shape \(4, 64\).*need \(4, 32\)"):
        jpeft.load_pretrained(tmp_path / "wide", params=base.params)
