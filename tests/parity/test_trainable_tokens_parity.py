"""Trainable tokens against PyTorch PEFT, both directions: PEFT's `TrainableTokensConfig` and
LoRA's `trainable_token_indices`, on a tiny Llama (untied head) and Qwen3 (head tied to the table).

PEFT's perturbed adapter loads in jpeft with PEFT's logits (merged too); jpeft's perturbed adapter
loads in PEFT with jpeft's logits; fresh rows are PEFT's (copies of the table's); keys, shapes and
adapter_config.json are PEFT's, including the second copy of the rows PEFT writes for a tied head.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import peft
import pytest
from hf_bases import load_hf, perturb_torch, torch_logits
from safetensors.numpy import load_file
from two_way import TOL, WEIGHTS

import jpeft
from jpeft.method import method_for

HEAD_KEY = "base_model.model.lm_head.trainable_tokens_delta"


def tokens_of(base) -> list[int]:
    """Three ids the test input holds and one it does not (its row shows in the head only)."""
    present = list(dict.fromkeys(int(i) for i in base.ids.reshape(-1)))[:3]
    absent = next(i for i in range(90, 96) if i not in base.ids)
    return sorted([*present, absent])


def configs(name: str, base, family: str) -> dict:
    """The keyword arguments of case `name` (same for PEFT and jpeft)."""
    ids = tokens_of(base)
    cases = {
        "defaults": ("TrainableTokensConfig", dict(token_indices=ids)),
        "random_init": ("TrainableTokensConfig", dict(token_indices=ids, init_weights=False)),
        "lora_list": (
            "LoraConfig",
            dict(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=ids),
        ),
        # an untied head gets rows of its own; a tied one listed with the table's ids is tied
        "lora_dict": (
            "LoraConfig",
            dict(
                r=2,
                target_modules=["o_proj"],
                trainable_token_indices={
                    "embed_tokens": ids,
                    "lm_head": ids[:2] if family == "llama" else ids,
                },
            ),
        ),
    }
    if family == "llama":
        cases["table_and_head"] = (
            "TrainableTokensConfig",
            dict(token_indices=ids, target_modules=["embed_tokens", "lm_head"]),
        )
    cls, kwargs = cases[name]
    return cls, dict(**kwargs, **base.common())


CASES = [
    ("llama", "defaults"),
    ("llama", "random_init"),
    ("llama", "table_and_head"),
    ("llama", "lora_list"),
    ("llama", "lora_dict"),
    ("qwen3", "defaults"),
    ("qwen3", "lora_list"),
    ("qwen3", "lora_dict"),
]


def saved_config(directory) -> dict:
    """adapter_config.json, target_modules sorted (PEFT saves a set in any order)."""
    data = json.loads((directory / "adapter_config.json").read_text())
    if isinstance(data["target_modules"], list):
        data["target_modules"] = sorted(data["target_modules"])
    return data


def perturbed(adapter: jpeft.Adapter) -> jpeft.Adapter:
    """Trainable leaves moved by 0.05 N(0, 1) (the frozen ids and original rows kept)."""
    rng = np.random.default_rng(3)
    trainable, frozen = jpeft.partition(adapter)
    moved = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), trainable)
    return jpeft.combine(moved, frozen)


@pytest.mark.parametrize("family, name", CASES)
def test_peft_adapter_loads_in_jpeft(base_of, family, name, tmp_path):
    base = base_of(family)
    cls, kwargs = configs(name, base, family)
    peft_model = peft.get_peft_model(load_hf(base.path), getattr(peft, cls)(**kwargs))
    perturb_torch(peft_model)
    expected = torch_logits(peft_model.eval(), base.ids)
    peft_model.save_pretrained(tmp_path)

    for params in (None, base.params):  # without params: the tie read from the file alone
        adapter = jpeft.load_pretrained(tmp_path, params)
        got = base.logits(base.params, adapter)
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
        base.assert_changed(got)
        merged = jpeft.merge(base.params, adapter)
        np.testing.assert_allclose(base.logits(merged), expected, atol=TOL, rtol=0)
    restored = jpeft.tree.flatten(jpeft.unmerge(merged, adapter))
    for path, leaf in jpeft.tree.flatten(base.params).items():  # LoRA's: within rounding
        np.testing.assert_allclose(restored[path], leaf, atol=1e-6, rtol=0, err_msg=path)
    table = "model.embed_tokens.weight"  # the table's rows: exactly
    np.testing.assert_array_equal(restored[table], jpeft.tree.flatten(base.params)[table])


@pytest.mark.parametrize("family, name", CASES)
def test_jpeft_adapter_loads_in_peft(base_of, family, name, tmp_path):
    base = base_of(family)
    cls, kwargs = configs(name, base, family)
    fresh = jpeft.init_adapter(
        base.params, getattr(jpeft, cls)(**kwargs), key=jax.random.key(0), model=base.model
    )
    adapter = perturbed(fresh)
    jpeft.save_pretrained(adapter, tmp_path / "jpeft")
    expected = base.logits(base.params, adapter)
    base.assert_changed(expected)
    loaded = peft.PeftModel.from_pretrained(load_hf(base.path), tmp_path / "jpeft").eval()
    np.testing.assert_allclose(torch_logits(loaded, base.ids), expected, atol=TOL, rtol=0)

    peft.get_peft_model(load_hf(base.path), getattr(peft, cls)(**kwargs)).save_pretrained(
        tmp_path / "peft"
    )
    theirs = load_file(tmp_path / "peft" / WEIGHTS)
    ours = load_file(tmp_path / "jpeft" / WEIGHTS)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    head_rows = cls == "TrainableTokensConfig" and (family == "qwen3" or name == "table_and_head")
    assert (HEAD_KEY in ours) == head_rows  # a tied head's copy of the rows, as PEFT writes it
    if kwargs.get("init_weights", True):  # fresh rows: PEFT's copies of the table, exactly
        fresh_tensors = method_for(fresh.config).to_file(fresh)[1]
        for key, value in theirs.items():
            if "token" in key:
                np.testing.assert_array_equal(np.asarray(fresh_tensors[key]), value, err_msg=key)
    assert saved_config(tmp_path / "jpeft") == saved_config(tmp_path / "peft")


def test_only_the_rows_train_and_a_tied_head_reads_them(base_of):
    """A gradient step reaches the rows (and nothing weight-sized); on a tied model the head's
    logits of the tokens change with the rows."""
    base = base_of("qwen3")
    ids = tokens_of(base)
    config = jpeft.TrainableTokensConfig(token_indices=ids)
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0), model=base.model)
    trainable, frozen = jpeft.partition(adapter)
    assert [np.shape(x) for x in jax.tree.leaves(trainable)] == [(len(ids), 32)]

    def loss(trainable):
        out = base.model.apply(base.params, base.ids, adapter=jpeft.combine(trainable, frozen))
        return out[..., ids[-1]].sum()

    grads = jax.grad(loss)(trainable)
    (grad,) = jax.tree.leaves(grads)
    assert np.abs(np.asarray(grad)[-1]).max() > 0  # the absent token: through the head only


def test_unmerge_needs_the_original_rows(base_of, tmp_path):
    base = base_of("llama")
    config = jpeft.TrainableTokensConfig(token_indices=tokens_of(base))
    adapter = perturbed(jpeft.init_adapter(base.params, config, key=jax.random.key(0)))
    jpeft.save_pretrained(adapter, tmp_path)
    loaded = jpeft.load_pretrained(tmp_path)
    merged = jpeft.merge(base.params, loaded)
    with pytest.raises(ValueError, match="cannot unmerge.*load_pretrained"):
        jpeft.unmerge(merged, loaded)


@pytest.mark.parametrize(
    "family, cls, kwargs, match",
    [
        ("llama", "TrainableTokensConfig", dict(token_indices=[3, 3]), "repeats token ids \\[3\\]"),
        ("llama", "TrainableTokensConfig", dict(token_indices=[-1]), "negative token ids"),
        ("llama", "TrainableTokensConfig", dict(token_indices=[96]), "96 rows.*\\[96\\]"),
        (
            "llama",
            "TrainableTokensConfig",
            dict(token_indices=[3], target_modules=["q_proj"]),
            "model.layers.0.self_attn.q_proj: jpeft trains tokens of an embedding",
        ),
        (
            "llama",
            "LoraConfig",
            dict(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[3]),
            "model.embed_tokens is both a LoRA target",
        ),
        (
            "llama",
            "LoraConfig",
            dict(
                target_modules=["q_proj"],
                modules_to_save=["embed_tokens"],
                trainable_token_indices=[3],
            ),
            "model.embed_tokens is in modules_to_save",
        ),
        (
            "qwen3",
            "LoraConfig",
            dict(target_modules=["q_proj"], trainable_token_indices={"lm_head": [4]}),
            "tied head 'lm_head'",
        ),
        (
            "llama",
            "LoraConfig",
            dict(target_modules=["q_proj"], trainable_token_indices={"wte": [4]}),
            "names 'wte', which matches no module",
        ),
    ],
)
def test_refusals_name_the_problem(base_of, family, cls, kwargs, match):
    base = base_of(family)
    with pytest.raises(ValueError, match=match):
        config = getattr(jpeft, cls)(**kwargs)
        jpeft.init_adapter(base.params, config, key=jax.random.key(0), model=base.model)


def test_file_rows_must_fit_the_config(base_of, tmp_path):
    base = base_of("llama")
    config = jpeft.TrainableTokensConfig(token_indices=[3, 4])
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0))
    jpeft.save_pretrained(adapter.replace(config=config.replace(token_indices=(3, 4, 5))), tmp_path)
    with pytest.raises(ValueError, match=r"trainable_tokens_delta has shape \(2, 32\).*3 token"):
        jpeft.load_pretrained(tmp_path)
