"""Several adapters in one folder, PEFT's layout, both ways: LoRA, IA3 and prompt tuning.

PEFT's `save_pretrained` writes the adapter named "default" at the top of the folder and every
other one in a sub-folder by name. A folder PEFT wrote loads in jpeft as {name: Adapter} with
PEFT's logits per adapter; a dict jpeft wrote loads in PEFT (`from_pretrained` for "default",
`load_adapter(<dir>/<name>, name)` for the others) with jpeft's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from hf_bases import build_base, load_hf, perturb_torch, torch_logits

import jpeft

TOL = 1e-4
CONFIGS = {
    "lora": (
        "LoraConfig",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=2, lora_alpha=4, target_modules=["up_proj"]),
    ),
    "ia3": (
        "IA3Config",
        dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        dict(target_modules=["v_proj"], feedforward_modules=[]),
    ),
    "prompt": (
        "PromptTuningConfig",
        dict(task_type="CAUSAL_LM", num_virtual_tokens=3),
        dict(task_type="CAUSAL_LM", num_virtual_tokens=5),
    ),
}
NAMES = ("default", "sql")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base("llama", tmp_path_factory.mktemp("base"))


def jpeft_logits(base, adapter) -> np.ndarray:
    _, model, params, ids = base
    return np.asarray(model.apply(params, jnp.asarray(ids), adapter=adapter))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_peft_folder_loads_as_a_dict(base, method, tmp_path):
    path, _, _, ids = base
    cls, first, second = CONFIGS[method]
    peft_model = peft.get_peft_model(load_hf(path), getattr(peft, cls)(**first))
    peft_model.add_adapter("sql", getattr(peft, cls)(**second))
    for name in NAMES:
        peft_model.set_adapter(name)
        perturb_torch(peft_model)  # the active adapter's leaves (and maybe others') move
    expected = {}
    for name in NAMES:
        peft_model.set_adapter(name)
        expected[name] = torch_logits(peft_model.eval(), ids)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "sql" / "adapter_config.json").is_file()

    loaded = jpeft.load_pretrained(tmp_path)
    assert sorted(loaded) == sorted(NAMES)
    for name in NAMES:
        np.testing.assert_allclose(jpeft_logits(base, loaded[name]), expected[name], atol=TOL)
        one = jpeft.load_pretrained(tmp_path, adapter_name=name)
        np.testing.assert_allclose(jpeft_logits(base, one), expected[name], atol=TOL)
    real = ids.shape[1]  # the real tokens' positions (prompt tuning puts its own first)
    assert np.abs(expected["default"][:, -real:] - expected["sql"][:, -real:]).max() > 100 * TOL


@pytest.mark.parametrize("method", list(CONFIGS))
def test_jpeft_dict_loads_in_peft(base, method, tmp_path):
    path, model, params, ids = base
    cls, first, second = CONFIGS[method]
    adapters = {}
    for name, fields, seed in ((NAMES[0], first, 0), (NAMES[1], second, 1)):
        fresh = jpeft.init_adapter(
            params, getattr(jpeft, cls)(**fields), key=jax.random.key(seed), model=model
        )
        rng = np.random.default_rng(seed)
        adapters[name] = jax.tree.map(
            lambda x, rng=rng: x + 0.05 * rng.standard_normal(x.shape, np.float32), fresh
        )
    jpeft.save_pretrained(adapters, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "sql" / "adapter_model.safetensors").is_file()

    peft_model = peft.PeftModel.from_pretrained(load_hf(path), tmp_path)
    peft_model.load_adapter(tmp_path / "sql", adapter_name="sql")
    for name in NAMES:
        peft_model.set_adapter(name)
        got = torch_logits(peft_model.eval(), ids)
        np.testing.assert_allclose(got, jpeft_logits(base, adapters[name]), atol=TOL)


def test_names_and_missing_adapters_are_explained(base, tmp_path):
    _, model, params, _ = base
    adapter = jpeft.init_adapter(
        params, jpeft.LoraConfig(target_modules=["q_proj"]), key=jax.random.key(0), model=model
    )
    for bad in ("", "..", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="adapter name"):
            jpeft.save_pretrained({bad: adapter}, tmp_path)
    jpeft.save_pretrained({"math": adapter, "code": adapter}, tmp_path)
    assert sorted(jpeft.load_pretrained(tmp_path)) == ["code", "math"]  # no "default" here
    with pytest.raises(FileNotFoundError, match=r"no adapter 'sql'.*\['code', 'math'\]"):
        jpeft.load_pretrained(tmp_path, adapter_name="sql")
    single = tmp_path / "single"
    jpeft.save_pretrained(adapter, single)
    assert isinstance(jpeft.load_pretrained(single), jpeft.Adapter)
