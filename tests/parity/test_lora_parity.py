"""LoRA family against PyTorch PEFT, both directions, on tiny random transformers models.

For each family and config: a PEFT adapter with non-zero B (and perturbed magnitudes, biases,
modules_to_save copies) loaded by jpeft gives PEFT's logits; jpeft's own adapter, perturbed away
from its init, saved by jpeft and loaded by `PeftModel.from_pretrained` gives jpeft's logits; the
saved keys and shapes equal those PEFT writes for the same config; merged logits equal unmerged.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from hf_bases import FAMILIES, build_base, load_hf, perturb_torch, torch_logits
from safetensors.numpy import load_file

import jpeft

TOL = 1e-4
CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=16, target_modules=["k_proj", "up_proj"], use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
    "modules_to_save": dict(r=2, target_modules=["o_proj"], modules_to_save=["lm_head"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 6, "model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={"q_proj": 3},
    ),
    "layers": dict(r=4, target_modules=["v_proj", "gate_proj"], layers_to_transform=[0, 2]),
    "exclude_regex": dict(
        r=4,
        target_modules=r".*\.(q|k|o)_proj",
        exclude_modules=["model.layers.1.self_attn.k_proj"],
    ),
}
CASES = [(family, name) for family in FAMILIES for name in CONFIGS]
CASES += [("qwen2", "bias_all"), ("qwen2", "bias_lora_only"), ("llama", "embedding")]
CASES += [("gemma3", "embedding")]  # PEFT scales the embedding delta too (Gemma's embed scale)
EXTRA = {
    "bias_all": dict(r=4, target_modules=["q_proj", "v_proj"], bias="all"),
    "bias_lora_only": dict(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only"),
    "embedding": dict(r=4, target_modules=["embed_tokens", "q_proj"]),
}


@pytest.fixture(scope="module")
def base_of(tmp_path_factory):
    """family -> (checkpoint dir, jpeft model, params, input ids), built once per family."""
    cache = {}

    def build(family: str):
        if family not in cache:
            cache[family] = build_base(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return build


def perturb_jax(adapter: jpeft.Adapter) -> jpeft.Adapter:
    trainable, frozen = jpeft.partition(adapter)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jpeft.combine(jax.tree.unflatten(treedef, leaves), frozen)


def config_kwargs(name: str) -> dict:
    return CONFIGS.get(name) or EXTRA[name]


@pytest.mark.parametrize("family, name", CASES)
def test_peft_adapter_loads_in_jpeft(base_of, family, name, tmp_path):
    path, model, params, ids = base_of(family)
    peft_model = peft.get_peft_model(load_hf(path), peft.LoraConfig(**config_kwargs(name)))
    perturb_torch(peft_model)
    expected = torch_logits(peft_model.eval(), ids)
    peft_model.save_pretrained(tmp_path)

    adapter = jpeft.load_pretrained(tmp_path)
    got = np.asarray(model.apply(params, jnp.asarray(ids), adapter=adapter))
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    # PEFT's merge: on a tied table (Gemma) the head changes too, as in jpeft's
    expected_merged = torch_logits(peft_model.merge_and_unload(), ids)
    merged = np.asarray(model.apply(jpeft.merge(params, adapter), jnp.asarray(ids)))
    np.testing.assert_allclose(merged, expected_merged, atol=TOL, rtol=0)


@pytest.mark.parametrize("family, name", CASES)
def test_jpeft_adapter_loads_in_peft(base_of, family, name, tmp_path):
    path, model, params, ids = base_of(family)
    kwargs = config_kwargs(name)
    adapter = perturb_jax(
        jpeft.init_adapter(params, jpeft.LoraConfig(**kwargs), key=jax.random.key(0))
    )
    jpeft.save_pretrained(adapter, tmp_path / "jpeft")
    expected = np.asarray(model.apply(params, jnp.asarray(ids), adapter=adapter))

    loaded = peft.PeftModel.from_pretrained(load_hf(path), tmp_path / "jpeft").eval()
    np.testing.assert_allclose(torch_logits(loaded, ids), expected, atol=TOL, rtol=0)

    reference = peft.get_peft_model(load_hf(path), peft.LoraConfig(**kwargs))
    reference.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "jpeft" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    theirs = {k: v for k, v in theirs.items() if not k.endswith("embed_tokens.base_layer.weight")}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    saved = json.loads((tmp_path / "jpeft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == kwargs["r"]

    merged = np.asarray(model.apply(jpeft.merge(params, adapter), jnp.asarray(ids)))
    np.testing.assert_allclose(
        merged, torch_logits(loaded.merge_and_unload(), ids), atol=TOL, rtol=0
    )


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_match_peft(base_of, init, tmp_path):
    """PiSSA/OLoRA: PEFT's unconverted file loads in jpeft (base residual recomputed), and jpeft's
    export is PEFT's converted rank-2r LoRA that loads on the original base weights."""
    path, model, params, ids = base_of("llama")
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=init)
    peft_model = peft.get_peft_model(load_hf(path), peft.LoraConfig(**kwargs))
    perturb_torch(peft_model)
    expected = torch_logits(peft_model.eval(), ids)
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="pass params="):
        jpeft.load_pretrained(tmp_path / "peft")
    adapter = jpeft.load_pretrained(tmp_path / "peft", params=params)
    got = np.asarray(model.apply(params, jnp.asarray(ids), adapter=adapter))
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)

    fresh = jpeft.init_adapter(params, jpeft.LoraConfig(**kwargs), key=jax.random.key(0))
    base_logits = np.asarray(model.apply(params, jnp.asarray(ids)))
    at_init = np.asarray(model.apply(params, jnp.asarray(ids), adapter=fresh))
    np.testing.assert_allclose(at_init, base_logits, atol=TOL, rtol=0)
    trained = perturb_jax(fresh)
    jpeft.save_pretrained(trained, tmp_path / "jpeft")
    saved = json.loads((tmp_path / "jpeft" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    loaded = peft.PeftModel.from_pretrained(load_hf(path), tmp_path / "jpeft").eval()
    ours = np.asarray(model.apply(params, jnp.asarray(ids), adapter=trained))
    np.testing.assert_allclose(torch_logits(loaded, ids), ours, atol=TOL, rtol=0)
