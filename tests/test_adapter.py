"""The Adapter pytree: init as PEFT does, merge/unmerge, partition, errors, training behaviour."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import TINY_LLAMA

import jpeft
from jpeft import train

TINY = TINY_LLAMA


@pytest.fixture(scope="module")
def tiny():
    """(model with a jitted apply, params, input ids [2, 7])."""
    model = jpeft.models.from_hf_config(TINY)
    params = model.init(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, TINY["vocab_size"])
    return JittedApply(model), params, ids


class JittedApply:
    """The model with `apply` jitted once, so each test compiles only its own adapter layout."""

    def __init__(self, model):
        self.model = model
        self.apply = jax.jit(model.apply)

    def __getattr__(self, name):
        return getattr(self.model, name)


def perturbed(adapter, scale=0.1):
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def test_init_matches_peft_distributions(tiny):
    _, params, _ = tiny
    config = jpeft.LoraConfig(r=8, target_modules=["up_proj"])
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(0))
    pieces = adapter.weights["model.layers.0.mlp.up_proj"]
    a, b = np.asarray(pieces["lora_A.weight"]), np.asarray(pieces["lora_B.weight"])
    assert a.shape == (8, 32) and b.shape == (48, 8) and not b.any()
    assert np.abs(a).max() <= 1 / np.sqrt(32) and np.abs(a).max() > 0.8 / np.sqrt(32)
    gaussian = jpeft.init_adapter(
        params, config.replace(init_lora_weights="gaussian", r=64), key=jax.random.key(0)
    )
    std = float(jnp.std(gaussian.weights["model.layers.1.mlp.up_proj"]["lora_A.weight"]))
    assert abs(std - 1 / 64) < 0.1 / 64


def test_fresh_adapter_is_identity_and_merge_unmerge_roundtrip(tiny):
    model, params, ids = tiny
    config = jpeft.LoraConfig(r=4, target_modules="all-linear", use_rslora=True)
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(0))
    base = model.apply(params, ids)
    np.testing.assert_array_equal(model.apply(params, ids, adapter=adapter), base)
    trained = perturbed(adapter)
    adapted = model.apply(params, ids, adapter=trained)
    assert float(jnp.abs(adapted - base).max()) > 1e-2
    merged = jpeft.merge(params, trained)
    np.testing.assert_allclose(model.apply(merged, ids), adapted, atol=1e-5)
    restored = jpeft.unmerge(merged, trained)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_dora_fresh_adapter_is_identity_and_unmerge_refuses(tiny):
    model, params, ids = tiny
    config = jpeft.LoraConfig(r=4, target_modules=["v_proj"], use_dora=True)
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(0))
    np.testing.assert_allclose(
        model.apply(params, ids, adapter=adapter), model.apply(params, ids), atol=1e-6
    )
    with pytest.raises(ValueError, match="DoRA merges are not invertible"):
        jpeft.unmerge(jpeft.merge(params, adapter), adapter)


def test_shape_mismatch_names_module_and_shapes(tiny):
    model, params, ids = tiny
    config = jpeft.LoraConfig(r=4, target_modules=["q_proj"])
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(0))
    name = "model.layers.1.self_attn.q_proj"
    bad = dict(adapter.weights)
    bad[name] = {**bad[name], "lora_A.weight": jnp.zeros((4, 16))}
    broken = adapter.replace(weights=bad)
    message = re.escape(f"{name}.lora_A.weight has shape (4, 16)") + ".*" + re.escape("(32, 32)")
    with pytest.raises(ValueError, match=message):
        model.apply(params, ids, adapter=broken)
    with pytest.raises(ValueError, match=message):
        jpeft.merge(params, broken)
    missing = adapter.replace(weights={"model.layers.7.self_attn.q_proj": adapter.weights[name]})
    with pytest.raises(ValueError, match="layer 7 does not exist, the model has 2 layers"):
        jpeft.merge(params, missing)


def test_dropout_only_on_the_adapter_branch(tiny):
    model, params, ids = tiny
    config = jpeft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.5)
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(0))
    key = jax.random.key(9)
    # B = 0: the adapter branch is zero, so dropout must not change the output at all.
    np.testing.assert_array_equal(
        model.apply(params, ids, adapter=adapter, dropout_key=key), model.apply(params, ids)
    )
    trained = perturbed(adapter)
    eval_out = model.apply(params, ids, adapter=trained)
    one = model.apply(params, ids, adapter=trained, dropout_key=key)
    again = model.apply(params, ids, adapter=trained, dropout_key=key)
    other = model.apply(params, ids, adapter=trained, dropout_key=jax.random.key(10))
    np.testing.assert_array_equal(one, again)
    assert float(jnp.abs(one - eval_out).max()) > 1e-4 and float(jnp.abs(one - other).max()) > 1e-4


def test_partition_combine_and_optax_mask(tiny):
    _, params, _ = tiny
    config = jpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(0))
    trainable, frozen = jpeft.partition(adapter)
    assert jax.tree.leaves(trainable.frozen) == [] and jax.tree.leaves(frozen.weights) == []
    restored = jpeft.combine(trainable, frozen)
    assert jax.tree.structure(restored) == jax.tree.structure(adapter)

    mask = jpeft.trainable_mask(adapter)
    assert all(jax.tree.leaves(mask.weights)) and not any(jax.tree.leaves(mask.frozen))
    optimizer = jpeft.optax_mask(optax.adamw(1e-2, weight_decay=0.5), adapter)
    state = optimizer.init(adapter)
    grads = jax.tree.map(jnp.ones_like, adapter)
    updates, _ = optimizer.update(grads, state, adapter)
    stepped = optax.apply_updates(adapter, updates)
    for before, after in zip(
        jax.tree.leaves(adapter.frozen), jax.tree.leaves(stepped.frozen), strict=True
    ):
        np.testing.assert_array_equal(before, after)
    assert all(
        float(jnp.abs(a - b).max()) > 0
        for a, b in zip(
            jax.tree.leaves(adapter.weights), jax.tree.leaves(stepped.weights), strict=True
        )
    )


def test_train_step_learns_and_never_forms_weight_gradients(tiny):
    model, params, ids = tiny
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(0))
    # 3e-2 oscillates with dropout on this tiny model (random init as of JAX 0.10); 1e-2 learns
    optimizer = optax.adamw(1e-2)
    trainable, _ = jpeft.partition(adapter)
    opt_state = optimizer.init(trainable)
    step = train.make_train_step(model.model, optimizer)
    batch = {"input_ids": ids, "labels": ids}

    hlo = step.lower(params, adapter, opt_state, batch, jax.random.key(0)).compile().as_text()
    weight_shapes = {"f32[32,32]", "f32[16,32]", "f32[48,32]", "f32[32,48]"}
    dots = re.findall(r"= (f32\[[\d,]+\])\{?[\d,]*\}? (?:dot|convolution)\(", hlo)
    assert dots, "no dot found: the HLO pattern is stale"
    assert not weight_shapes & set(dots), "a weight-shaped gradient was computed"

    losses = []
    for i in range(30):
        adapter, opt_state, loss = step(params, adapter, opt_state, batch, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.2, losses
    assert step._cache_size() == 1


def test_layers_below_the_adapter_run_without_backward(tiny):
    model, params, ids = tiny
    config = jpeft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    adapter = perturbed(jpeft.init_adapter(params, config, key=jax.random.key(0)))
    assert jpeft.injection.untouched_layers(params, adapter) == 1
    head = jpeft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    assert (
        jpeft.injection.untouched_layers(
            params, jpeft.init_adapter(params, head, key=jax.random.key(0))
        )
        == 0
    )

    def loss(adapter, frozen_layers):
        injected = jpeft.inject(params, adapter)
        hidden = model.model._hidden(injected, ids, None, None, frozen_layers)
        return jnp.mean(model.model._head(injected, hidden) ** 2)

    split = jax.jit(jax.value_and_grad(lambda a: loss(a, 1)))
    whole = jax.jit(jax.value_and_grad(lambda a: loss(a, 0)))
    (value_split, grad_split), (value_whole, grad_whole) = split(adapter), whole(adapter)
    np.testing.assert_allclose(value_split, value_whole, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_split), jax.tree.leaves(grad_whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # forward 2 + backward 2 layer iterations without the split; 1 + 1 + backward 1 with it
    assert scan_iterations(lambda a: loss(a, 1), adapter) == 3
    assert scan_iterations(lambda a: loss(a, 0), adapter) == 4


def scan_iterations(fn, adapter) -> int:
    """Total trip count of the scans in the gradient's jaxpr."""
    jaxpr = jax.make_jaxpr(jax.grad(fn))(adapter).jaxpr
    return sum(eqn.params["length"] for eqn in jaxpr.eqns if eqn.primitive.name == "scan")


def test_layers_of_a_stacked_module_with_different_pieces_are_refused(tiny):
    model, params, ids = tiny
    config = jpeft.LoraConfig(r=4, target_modules=["q_proj"])
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(0))
    weights = dict(adapter.weights)
    name = "model.layers.1.self_attn.q_proj"
    weights[name] = {**weights[name], "lora_magnitude_vector": jnp.ones(32)}
    with pytest.raises(ValueError, match=r"different adapter pieces .*layers\.1\.self_attn"):
        jpeft.inject(params, adapter.replace(weights=weights))
