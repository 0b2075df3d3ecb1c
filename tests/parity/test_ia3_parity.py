"""IA3 against PyTorch PEFT, both directions, on tiny random Llama and Qwen2 models.

For each family and config: a PEFT adapter with perturbed vectors (and modules_to_save copy)
loaded by jpeft gives PEFT's logits; jpeft's own adapter, perturbed away from ones, saved by jpeft
and loaded by `PeftModel.from_pretrained` gives jpeft's logits; the saved keys and shapes equal
those PEFT writes for the same config; merged logits equal unmerged. Qwen2 has q/k/v biases, so
its output-scaled modules check the bias scaling; greedy generation matches PEFT's once per family.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hf_bases import build_base, load_hf, perturb_torch, torch_logits
from safetensors.numpy import load_file

import jpeft

TOL = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0}
FAMILIES = ("llama", "qwen2", "gemma3")
CONFIGS = {
    "defaults": {},
    "explicit": dict(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        feedforward_modules=["up_proj", "down_proj"],
    ),
    "regex": dict(target_modules=r".*\.(q|v|up|down)_proj"),
    "modules_to_save": dict(
        target_modules=["k_proj", "o_proj", "up_proj"],
        feedforward_modules=r".*\.up_proj",
        modules_to_save=["lm_head"],
    ),
}
CASES = [(family, name) for family in FAMILIES for name in CONFIGS]


@pytest.fixture(scope="module")
def base_of(tmp_path_factory):
    """family -> Base, built once per family."""
    cache = {}

    def build(family: str) -> Base:
        if family not in cache:
            cache[family] = Base(*build_base(family, tmp_path_factory.mktemp(family)))
        return cache[family]

    return build


class Base:
    """A tiny checkpoint and its jpeft model, with the base logits computed once.

    `apply` and `generate` are jitted here with XLA's backend optimizations off, which halves each
    compile (one per adapter layout); merged params reuse the base compilation.
    """

    def __init__(self, path, model, params, ids):
        self.path, self.model, self.params, self.ids = path, model, params, ids
        self._apply = jax.jit(model.apply, compiler_options=FAST_COMPILE)
        self._generate = jax.jit(
            lambda params, ids, adapter: model.generate(params, ids, 5, adapter=adapter),
            compiler_options=FAST_COMPILE,
        )
        self.base_logits = self.logits(params)

    def logits(self, params, adapter=None) -> np.ndarray:
        return np.asarray(self._apply(params, jnp.asarray(self.ids), adapter=adapter))

    def generate(self, adapter) -> np.ndarray:
        """Greedy decoding of 5 new tokens: [B, S + 5]."""
        return np.asarray(self._generate(self.params, jnp.asarray(self.ids), adapter))

    def assert_changed(self, logits) -> None:
        """The perturbed adapter must move the logits well beyond the tolerance."""
        assert np.abs(logits - self.base_logits).max() > 100 * TOL


def perturb_jax(adapter: jpeft.Adapter) -> jpeft.Adapter:
    """Every trainable leaf moved by 0.05 N(0, 1) noise (numpy's, so nothing compiles)."""
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), adapter)


@pytest.mark.parametrize("family, name", CASES)
def test_peft_adapter_loads_in_jpeft(base_of, family, name, tmp_path):
    base = base_of(family)
    peft_model = peft.get_peft_model(load_hf(base.path), peft.IA3Config(**CONFIGS[name]))
    perturb_torch(peft_model)
    expected = torch_logits(peft_model.eval(), base.ids)
    peft_model.save_pretrained(tmp_path)

    adapter = jpeft.load_pretrained(tmp_path)
    got = base.logits(base.params, adapter)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    base.assert_changed(got)
    merged = base.logits(jpeft.merge(base.params, adapter))
    np.testing.assert_allclose(merged, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("family, name", CASES)
def test_jpeft_adapter_loads_in_peft(base_of, family, name, tmp_path):
    base = base_of(family)
    config = jpeft.IA3Config(**CONFIGS[name])
    fresh = jpeft.init_adapter(base.params, config, key=jax.random.key(0), model=base.model)
    adapter = perturb_jax(fresh)
    jpeft.save_pretrained(adapter, tmp_path / "jpeft")
    expected = base.logits(base.params, adapter)
    base.assert_changed(expected)

    loaded = peft.PeftModel.from_pretrained(load_hf(base.path), tmp_path / "jpeft").eval()
    np.testing.assert_allclose(torch_logits(loaded, base.ids), expected, atol=TOL, rtol=0)

    reference = peft.get_peft_model(load_hf(base.path), peft.IA3Config(**CONFIGS[name]))
    reference.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "jpeft" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    saved = json.loads((tmp_path / "jpeft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3"

    merged = base.logits(jpeft.merge(base.params, adapter))
    np.testing.assert_allclose(merged, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_peft(base_of, family, tmp_path):
    base = base_of(family)
    peft_model = peft.get_peft_model(load_hf(base.path), peft.IA3Config(**CONFIGS["explicit"]))
    perturb_torch(peft_model)
    ids = torch.tensor(base.ids)
    with torch.no_grad():
        expected = peft_model.eval().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
    peft_model.save_pretrained(tmp_path)

    adapter = jpeft.load_pretrained(tmp_path)
    np.testing.assert_array_equal(base.generate(adapter), expected.numpy())
