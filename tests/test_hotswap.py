"""Switching adapters without recompiling: same-structure adapters swap as they are, and
`jpeft.hotswap.pad_to` gives LoRA adapters of other ranks, alphas and targets one structure.

Compilations are counted: a Python counter in the traced function (`model.apply` under jit), and
the jitted functions' own caches (the train step, `generate`'s loop)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import save_word_level_llama

import jpeft
from jpeft.hotswap import pad_to
from jpeft.models import llama
from jpeft.train import make_train_step

LIKE = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
OTHERS = [
    dict(r=4, lora_alpha=4, target_modules=["q_proj"]),
    dict(r=8, lora_alpha=32, use_rslora=True, target_modules=["v_proj", "up_proj"]),
    dict(r=2, lora_alpha=8, target_modules=["up_proj"], rank_pattern={"layers.1.mlp.up_proj": 1}),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model, params = jpeft.models.from_pretrained(
        save_word_level_llama(tmp_path_factory.mktemp("m"))
    )
    ids = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, (2, 7)))
    return model, params, ids


def lora(base, fields, seed) -> jpeft.Adapter:
    """A LoRA adapter with B moved off zero, so it changes the logits."""
    model, params, _ = base
    config = jpeft.LoraConfig(**fields)
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(seed), model=model)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), adapter)


def test_padded_adapters_share_one_compiled_apply(base):
    model, params, ids = base
    traces = []

    @jax.jit
    def apply(params, ids, adapter):
        traces.append(1)
        return model.apply(params, ids, adapter=adapter)

    like = lora(base, LIKE, 0)
    apply(params, ids, like)
    for seed, fields in enumerate(OTHERS, start=1):
        adapter = lora(base, fields, seed)
        expected = np.asarray(model.apply(params, ids, adapter=adapter))
        padded = pad_to(adapter, like)
        np.testing.assert_allclose(np.asarray(apply(params, ids, padded)), expected, atol=1e-5)
        assert np.abs(expected - np.asarray(model.apply(params, ids))).max() > 1e-3
    assert len(traces) == 1


def test_train_step_and_generate_compile_once(base):
    model, params, ids = base
    like = lora(base, LIKE, 0)
    optimizer = optax.adam(1e-3)
    step = make_train_step(model, optimizer)
    batch = {"input_ids": ids, "labels": ids}
    generate_before = llama._generate._cache_size()  # other tests may have filled it
    for seed, fields in enumerate([LIKE, *OTHERS]):
        adapter = pad_to(lora(base, fields, seed), like)
        opt_state = optimizer.init(jpeft.partition(adapter)[0])
        adapter, _, _ = step(params, adapter, opt_state, batch, None)  # donates its inputs
        model.generate(params, ids, 3, adapter=adapter)
    assert step._cache_size() == 1
    assert llama._generate._cache_size() - generate_before == 1


def test_same_structure_swaps_without_padding(base):
    """Equal configs and shapes: nothing to do, the compiled program is reused."""
    model, params, ids = base
    traces = []

    @jax.jit
    def apply(params, ids, adapter):
        traces.append(1)
        return model.apply(params, ids, adapter=adapter)

    for seed in range(3):
        apply(params, ids, lora(base, LIKE, seed))
    assert len(traces) == 1


@pytest.mark.parametrize(
    "like_fields, fields, match",
    [
        (dict(r=2, target_modules=["q_proj"]), dict(r=4, target_modules=["q_proj"]), "rank 4"),
        (dict(target_modules=["q_proj"]), dict(target_modules=["v_proj"]), "modules `like`"),
        (dict(target_modules=["q_proj"]), dict(target_modules=["q_proj"], use_dora=True), "DoRA"),
    ],
)
def test_what_cannot_be_padded(base, like_fields, fields, match):
    with pytest.raises(ValueError, match=match):
        pad_to(lora(base, fields, 1), lora(base, like_fields, 0))
