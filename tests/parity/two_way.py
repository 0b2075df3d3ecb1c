"""The two-way parity check every weight method's test file runs against PyTorch PEFT.

For a family and a config: PEFT's adapter, every piece perturbed away from its init (and any
modules_to_save copy), saved by PEFT and loaded by jpeft gives PEFT's logits, merged or not;
jpeft's adapter, perturbed, saved by jpeft and loaded by `PeftModel.from_pretrained` gives
jpeft's logits; the saved keys, shapes and adapter_config.json equal those PEFT writes for the
same config. `two_way_tests(...)` gives a test file both tests, parametrized over its cases; the
`base_of` fixture (conftest.py) builds each family's tiny checkpoint once per module.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hf_bases import load_hf, perturb_torch, torch_logits
from safetensors.numpy import load_file

import jpeft
from jpeft import tree as jtree
from jpeft.method import method_for

TOL = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0}
WEIGHTS = "adapter_model.safetensors"


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


def hf_weight(params, name: str) -> np.ndarray:
    """The [out, in] weight HF calls `name` from a jpeft param tree."""
    path, layer = jtree.hf_param_path(params, name)
    return np.asarray(jtree.layer_of(jtree.get_path(params, path), layer))


def check_merge_like_peft(base: Base, peft_model, adapter: jpeft.Adapter, module: str) -> None:
    """jpeft's merge of `adapter` gives the weight PEFT's `merge_adapter` gives `module`, and
    unmerge restores it as PEFT's `unmerge_adapter` does (and the base's own weight)."""
    layer = peft_model.get_submodule(f"base_model.model.{module}")
    merged = jpeft.merge(base.params, adapter)
    with torch.no_grad():
        peft_model.merge_adapter()
        np.testing.assert_allclose(
            hf_weight(merged, f"{module}.weight"), layer.base_layer.weight.numpy(), atol=1e-6
        )
        peft_model.unmerge_adapter()
        restored = hf_weight(jpeft.unmerge(merged, adapter), f"{module}.weight")
        np.testing.assert_allclose(restored, layer.base_layer.weight.numpy(), atol=1e-5)
    np.testing.assert_allclose(restored, hf_weight(base.params, f"{module}.weight"), atol=1e-5)


def two_way_tests(config_name: str, configs: dict, cases: list[tuple[str, str]]):
    """(test_peft_adapter_loads_in_jpeft, test_jpeft_adapter_loads_in_peft) for the config class
    `config_name` (the same name in peft and jpeft) over `cases` [(family, config name)]."""

    @pytest.mark.parametrize("family, name", cases)
    def test_peft_adapter_loads_in_jpeft(base_of, family, name, tmp_path):
        base = base_of(family)
        config = getattr(peft, config_name)(**configs[name], **base.common())
        check_peft_adapter_loads(base, config, tmp_path)

    @pytest.mark.parametrize("family, name", cases)
    def test_jpeft_adapter_loads_in_peft(base_of, family, name, tmp_path):
        base = base_of(family)
        kwargs = dict(**configs[name], **base.common())
        ours, theirs = getattr(jpeft, config_name)(**kwargs), getattr(peft, config_name)(**kwargs)
        check_jpeft_adapter_loads(base, ours, theirs, tmp_path)

    return test_peft_adapter_loads_in_jpeft, test_jpeft_adapter_loads_in_peft
