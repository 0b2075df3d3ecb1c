"""IA3: config and JSON as PEFT's, defaults per model type, init, merge/unmerge, training."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
from tiny_models import TINY_LLAMA

import jpeft
from jpeft import train
from jpeft.method import config_from_dict
from jpeft.methods.ia3 import IA3Weight, is_feedforward

TINY = {**TINY_LLAMA, "model_type": "qwen2"}
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Per-layer weight shapes [out, in] of the tiny model.
SHAPES = {
    "q_proj": (32, 32),
    "k_proj": (16, 32),
    "v_proj": (16, 32),
    "o_proj": (32, 32),
    "gate_proj": (48, 32),
    "up_proj": (48, 32),
    "down_proj": (32, 48),
}
EXPLICIT = jpeft.IA3Config(
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    feedforward_modules=["up_proj", "down_proj"],
)
CONFIG_KWARGS = [
    {},
    dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    dict(
        target_modules=r".*\.(q|v)_proj",
        feedforward_modules=r".*\.v_proj",
        exclude_modules=["model.layers.0.self_attn.q_proj"],
        modules_to_save=["lm_head"],
        init_ia3_weights=False,
        task_type="CAUSAL_LM",
    ),
]


@pytest.fixture(scope="module")
def tiny():
    """(model, jitted apply, params with random q/k/v biases, input ids [2, 7]).

    `apply` is compiled without XLA's backend optimizations: each adapter layout compiles anew,
    and this halves the time it takes.
    """
    model = jpeft.models.from_hf_config(TINY)
    rng = np.random.default_rng(0)

    def randomize_bias(path, leaf):
        is_bias = jax.tree_util.keystr(path).endswith("['bias']")
        return leaf + 0.1 * rng.standard_normal(leaf.shape, np.float32) if is_bias else leaf

    params = jax.tree_util.tree_map_with_path(randomize_bias, model.init(jax.random.key(0)))
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, TINY["vocab_size"])
    return model, jax.jit(model.apply, compiler_options=FAST_COMPILE), params, ids


def init(tiny, config: jpeft.IA3Config) -> jpeft.Adapter:
    model, _, params, _ = tiny
    return jpeft.init_adapter(params, config, key=jax.random.key(0), model=model)


def perturbed(adapter: jpeft.Adapter) -> jpeft.Adapter:
    rng = np.random.default_rng(5)
    return jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape, np.float32), adapter)


def vector_shapes(adapter: jpeft.Adapter) -> dict[str, tuple[int, int]]:
    return {name: tuple(pieces["ia3_l"].shape) for name, pieces in adapter.weights.items()}


# ---------------------------------------------------------------------------------------------
# config


def unordered(value):
    """PEFT keeps module lists as sets: compare them sorted."""
    return sorted(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("kwargs", CONFIG_KWARGS)
def test_json_matches_peft_both_ways(kwargs, tmp_path):
    peft.IA3Config(**kwargs).save_pretrained(tmp_path)
    theirs = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = jpeft.IA3Config(**kwargs).to_dict()
    assert set(ours) == set(theirs)
    for key in set(theirs) - {"peft_version"}:
        assert unordered(ours[key]) == unordered(theirs[key]), key
    loaded = config_from_dict(theirs)
    for field in dataclasses.fields(jpeft.IA3Config):
        want = getattr(jpeft.IA3Config(**kwargs), field.name)
        assert unordered(getattr(loaded, field.name)) == unordered(want), field.name


def test_defaults_are_peft_defaults():
    ours, theirs = jpeft.IA3Config(), peft.IA3Config()
    for field in dataclasses.fields(jpeft.IA3Config):
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name


def test_feedforward_must_be_a_subset_of_listed_targets():
    kwargs = dict(target_modules=["q_proj", "v_proj"], feedforward_modules=["down_proj", "v_proj"])
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(**kwargs)
    message = (
        re.escape("feedforward_modules=['down_proj', 'v_proj'] must be a subset of ")
        + re.escape("target_modules=['q_proj', 'v_proj'], but ['down_proj'] are not targets")
        + ".*add them to target_modules"
    )
    with pytest.raises(ValueError, match=message):
        jpeft.IA3Config(**kwargs)
    # PEFT checks only two lists: a regex target, or targets left to the model type, pass.
    for kwargs in (
        dict(target_modules=r".*_proj", feedforward_modules=["down_proj"]),
        dict(feedforward_modules=["up_proj"]),
    ):
        peft.IA3Config(**kwargs)
        jpeft.IA3Config(**kwargs)


def test_feedforward_matching_rules():
    name = "model.layers.0.mlp.down_proj"
    assert is_feedforward(r".*\.down_proj", name)
    assert not is_feedforward("down_proj", name)  # a regex must match the whole name
    assert is_feedforward(["down_proj"], name)
    assert is_feedforward(["proj"], name)  # PEFT: any suffix, not only after a dot
    assert not is_feedforward(["mlp"], name)
    assert not is_feedforward([], name)


# ---------------------------------------------------------------------------------------------
# init


@pytest.mark.parametrize(
    "model_type, attention", [("llama", ("k_proj", "v_proj")), ("qwen2", ("q_proj", "v_proj"))]
)
def test_defaults_come_from_the_model_type(tiny, model_type, attention):
    _, _, params, _ = tiny
    model = jpeft.models.from_hf_config({**TINY, "model_type": model_type})
    adapter = jpeft.init_adapter(params, jpeft.IA3Config(), key=jax.random.key(0), model=model)
    expected = {}
    for layer in range(TINY["num_hidden_layers"]):
        for short in attention:
            expected[f"model.layers.{layer}.self_attn.{short}"] = (SHAPES[short][0], 1)
        expected[f"model.layers.{layer}.mlp.down_proj"] = (1, SHAPES["down_proj"][1])
    assert vector_shapes(adapter) == expected


def test_listed_targets_take_the_default_feedforward_modules(tiny):
    shapes = vector_shapes(init(tiny, jpeft.IA3Config(target_modules=["q_proj", "down_proj"])))
    assert shapes["model.layers.1.mlp.down_proj"] == (1, 48)
    assert shapes["model.layers.1.self_attn.q_proj"] == (32, 1)
    # explicit feedforward_modules replace the default, even when they match no target
    shapes = vector_shapes(init(tiny, jpeft.IA3Config(feedforward_modules=["up_proj"])))
    assert shapes["model.layers.0.mlp.down_proj"] == (32, 1)


def test_defaults_need_the_model_type(tiny):
    _, _, params, _ = tiny
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="target_modules is None.*pass model="):
        jpeft.init_adapter(params, jpeft.IA3Config(), key=key)
    with pytest.raises(ValueError, match="feedforward_modules is None.*pass model="):
        jpeft.init_adapter(params, jpeft.IA3Config(target_modules=["q_proj"]), key=key)


def test_vector_shapes_and_init(tiny):
    adapter = init(tiny, EXPLICIT)
    for name, shape in vector_shapes(adapter).items():
        out_dim, in_dim = SHAPES[name.rsplit(".", 1)[1]]
        assert shape == ((1, in_dim) if name.endswith(("up_proj", "down_proj")) else (out_dim, 1))
    leaves = jax.tree.leaves(adapter.weights)
    assert len(leaves) == 12 and all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert all(np.all(np.asarray(leaf) == 1) for leaf in leaves)
    random = init(tiny, EXPLICIT.replace(init_ia3_weights=False))
    values = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(random.weights)])
    assert abs(values.std() - 1) < 0.15 and abs(values.mean()) < 0.15


def test_modules_to_save_are_trainable_copies(tiny):
    _, _, params, _ = tiny
    config = jpeft.IA3Config(target_modules=["q_proj"], modules_to_save=["lm_head"])
    adapter = init(tiny, config)
    assert list(adapter.overrides) == ["lm_head.weight"]
    np.testing.assert_array_equal(adapter.overrides["lm_head.weight"], params["lm_head"]["weight"])


def test_fan_in_fan_out_warns(tiny):
    with pytest.warns(UserWarning, match="fan_in_fan_out=True has no effect"):
        init(tiny, EXPLICIT.replace(fan_in_fan_out=True))


def test_only_linear_layers(tiny):
    config = jpeft.IA3Config(target_modules=["embed_tokens", "q_proj"], feedforward_modules=[])
    with pytest.raises(ValueError, match="embed_tokens is an embedding table.*linear layers only"):
        init(tiny, config)
    node = IA3Weight(jnp.ones((4, 3)), jnp.ones((4, 1)))
    with pytest.raises(TypeError, match="embedding table"):
        node.embed(jnp.zeros((2,), jnp.int32))


# ---------------------------------------------------------------------------------------------
# forward, merge, unmerge


def test_init_is_identity_and_merge_unmerge_roundtrip(tiny):
    _, apply, params, ids = tiny
    adapter = init(tiny, EXPLICIT)
    base = apply(params, ids)
    np.testing.assert_array_equal(apply(params, ids, adapter=adapter), base)
    trained = perturbed(adapter)
    adapted = apply(params, ids, adapter=trained)
    assert float(jnp.abs(adapted - base).max()) > 1e-2
    merged = jpeft.merge(params, trained)
    np.testing.assert_allclose(apply(merged, ids), adapted, atol=1e-5)
    q_bias = params["model"]["layers"]["self_attn"]["q_proj"]["bias"][1]
    scale = trained.weights["model.layers.1.self_attn.q_proj"]["ia3_l"][:, 0]
    np.testing.assert_allclose(
        merged["model"]["layers"]["self_attn"]["q_proj"]["bias"][1], q_bias * scale, rtol=1e-6
    )
    restored = jpeft.unmerge(merged, trained)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_layers_without_the_vector_are_left_alone(tiny):
    """A stacked module targeted in layer 1 only: layer 0's zero-padded slot must act as ones."""
    _, apply, params, ids = tiny
    config = jpeft.IA3Config(
        target_modules=r"model\.layers\.1\.(self_attn\.k_proj|mlp\.down_proj)",
        feedforward_modules=["down_proj"],
    )
    adapter = init(tiny, config)
    assert sorted(vector_shapes(adapter).values()) == [(1, 48), (16, 1)]
    at_init = apply(params, ids, adapter=adapter)
    np.testing.assert_allclose(at_init, apply(params, ids), atol=1e-6, rtol=0)
    merged = jpeft.merge(params, perturbed(adapter))
    for module in ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "mlp.down_proj.weight"):
        path = f"model.layers.{module}"
        got, want = jpeft.tree.get_path(merged, path), jpeft.tree.get_path(params, path)
        np.testing.assert_array_equal(got[0], want[0])
        assert float(jnp.abs(got[1] - want[1]).max()) > 1e-3, module


def test_a_stacked_module_cannot_mix_feedforward_and_output_vectors(tiny):
    _, apply, params, ids = tiny
    config = jpeft.IA3Config(
        target_modules=["down_proj"], feedforward_modules=r"model\.layers\.1\.mlp\.down_proj"
    )
    with pytest.raises(ValueError, match=r"feed-forward in layers \[1\] but not in layers \[0\]"):
        init(tiny, config)
    mixed = jpeft.Adapter(
        config,
        {
            "model.layers.0.mlp.down_proj": {"ia3_l": jnp.ones((32, 1))},
            "model.layers.1.mlp.down_proj": {"ia3_l": jnp.ones((1, 48))},
        },
    )
    with pytest.raises(ValueError, match=r"feed-forward vector \(1, 48\) and others an output"):
        apply(params, ids, adapter=mixed)


def test_shape_mismatch_names_module_and_shapes(tiny):
    _, apply, params, ids = tiny
    adapter = init(tiny, EXPLICIT)
    name = "model.layers.1.self_attn.k_proj"
    broken = adapter.replace(weights={**adapter.weights, name: {"ia3_l": jnp.ones((32, 1))}})
    message = re.escape(
        f"{name}.ia3_l has shape (32, 1), but the model's weight {name}.weight has shape "
        "(16, 32), which needs ia3_l of shape (1, 32) (feed-forward) or (16, 1)"
    )
    with pytest.raises(ValueError, match=message):
        apply(params, ids, adapter=broken)
    with pytest.raises(ValueError, match=message):
        jpeft.merge(params, broken)


# ---------------------------------------------------------------------------------------------
# training


def test_gradients_reach_only_the_vectors_and_training_learns(tiny):
    model, _, params, ids = tiny
    adapter = init(tiny, EXPLICIT)
    batch = {"input_ids": ids, "labels": ids}

    def loss(trainable):
        return train.causal_lm_loss(model.apply(params, ids, adapter=trainable), ids)

    grads = jax.eval_shape(jax.grad(loss), adapter)
    shapes = {name: {"ia3_l": shape} for name, shape in vector_shapes(adapter).items()}
    assert jax.tree.map(lambda g: g.shape, grads.weights) == shapes
    assert grads.overrides == {} and grads.frozen == {}

    optimizer = optax.adam(5e-2)
    opt_state = optimizer.init(jpeft.partition(adapter)[0])
    step = train.make_train_step(model, optimizer)
    lowered = step.lower(params, adapter, opt_state, batch).as_text()
    weights = [*SHAPES.values(), (TINY["vocab_size"], TINY["hidden_size"])]
    weight_types = {f"tensor<{'x'.join(map(str, s))}xf32>" for s in weights}
    weight_types |= {f"tensor<2x{'x'.join(map(str, s))}xf32>" for s in weights}
    ops = re.findall(r"stablehlo\.(multiply|divide|dot_general) .*(tensor<[^>]*>)$", lowered, re.M)
    assert any(op == "dot_general" for op, _ in ops), "no dot found: the pattern is stale"
    assert not weight_types & {result for _, result in ops}, "a weight-sized array was formed"

    losses = []
    for _ in range(8):
        adapter, opt_state, value = step(params, adapter, opt_state, batch)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(np.any(np.asarray(leaf) != 1) for leaf in jax.tree.leaves(adapter.weights))
