"""QLoRA in jpeft itself: quantizing a param tree, training on it, merging, and bad input.

The comparisons with bitsandbytes and PEFT are in tests/parity/test_qlora_parity.py.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import TINY_LLAMA, random_causal_lm

import jpeft
from jpeft.quant import (
    QuantConfig,
    QuantizedTensor,
    dequantize,
    dequantize_params,
    quantize,
    quantize_params,
    stack,
    to_bnb,
    unstack,
)
from jpeft.train import make_train_step

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CONFIG = dict(TINY_LLAMA, hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def model_and_params():
    model = jpeft.models.from_hf_config(CONFIG)
    return model, model.init(jax.random.key(0))


def quantized_paths(params) -> set[str]:
    flat = jpeft.tree.flatten(params)
    return {path for path, leaf in flat.items() if isinstance(leaf, QuantizedTensor)}


def test_quantize_params_takes_every_projection_but_the_head(model_and_params):
    _, params = model_and_params
    qparams = quantize_params(params)
    paths = quantized_paths(qparams)
    assert {p.split(".")[-2] for p in paths} == PROJECTIONS and len(paths) == len(PROJECTIONS)
    q = jpeft.tree.get_path(qparams, "model.layers.mlp.down_proj.weight")
    assert q.shape == (2, 64, 128) and q.stack_shape == (2,) and q.weight_shape == (64, 128)
    # Each layer is quantized on its own, as bitsandbytes quantizes each nn.Linear.
    dense = params["model"]["layers"]["mlp"]["down_proj"]["weight"]
    for layer, weight in zip(unstack(q), dense, strict=True):
        assert to_bnb(layer)["weight"].tobytes() == to_bnb(quantize(weight))["weight"].tobytes()
    np.testing.assert_array_equal(dequantize(q), jnp.stack([dequantize(w) for w in unstack(q)]))
    skipped = quantize_params(params, QuantConfig(skip_modules=("lm_head", "mlp.down_proj")))
    assert not any("down_proj" in p for p in quantized_paths(skipped))


def test_stack_refuses_mixed_formats():
    w = jnp.ones((4, 64))
    with pytest.raises(ValueError, match="one format and shape"):
        stack([quantize(w), quantize(w, "fp4")])
    with pytest.raises(ValueError, match="use jpeft.quant.unstack"):
        to_bnb(stack([quantize(w), quantize(w)]))
    with pytest.raises(ValueError, match="blocksize 100 is not supported"):
        QuantConfig(blocksize=100)


@pytest.mark.parametrize(
    "config",
    [
        jpeft.LoraConfig(r=4, target_modules="all-linear"),
        jpeft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=True),
        jpeft.IA3Config(),
    ],
    ids=["lora", "dora", "ia3"],
)
def test_training_on_a_quantized_base(model_and_params, config):
    """The loss falls, the adapter stays float32, and every step equals the step on the
    dequantized float params (the quantized matmul changes memory, not the math)."""
    model, params = model_and_params
    qparams = quantize_params(params, QuantConfig("nf4", 64, double_quant=True))
    adapter = jpeft.init_adapter(qparams, config, key=jax.random.key(1), model=model)
    assert {leaf.dtype for leaf in jax.tree.leaves(adapter)} == {jnp.dtype(jnp.float32)}
    optimizer = optax.adam(5e-2)
    step = make_train_step(model, optimizer)
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, CONFIG["vocab_size"])
    batch = {"input_ids": ids, "labels": ids}
    floats = dequantize_params(qparams)
    on_floats = jax.tree.map(jnp.copy, adapter)
    state, float_state = (optimizer.init(jpeft.partition(adapter)[0]) for _ in range(2))
    losses = []
    for _ in range(5):
        adapter, state, loss = step(qparams, adapter, state, batch)
        on_floats, float_state, float_loss = step(floats, on_floats, float_state, batch)
        np.testing.assert_allclose(loss, float_loss, rtol=1e-5)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.02, losses


def test_merge_into_quantized_base(model_and_params):
    model, params = model_and_params
    qparams = quantize_params(params, QuantConfig("fp4"))
    config = jpeft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False)
    adapter = jpeft.init_adapter(qparams, config, key=jax.random.key(3))
    ids = jnp.arange(10)[None] % CONFIG["vocab_size"]
    expected = model.apply(qparams, ids, adapter=adapter)
    merged = jpeft.merge(qparams, adapter)
    assert quantized_paths(merged) == set()
    assert merged["model"]["layers"]["mlp"]["up_proj"]["weight"].dtype == jnp.float32
    np.testing.assert_allclose(model.apply(merged, ids), expected, atol=1e-5)
    requantized = jpeft.merge(qparams, adapter, requantize=True)
    assert quantized_paths(requantized) == quantized_paths(qparams)
    untouched = "model.layers.mlp.up_proj.weight"
    for tree in (requantized, qparams):
        assert isinstance(jpeft.tree.get_path(tree, untouched), QuantizedTensor)
    assert jpeft.tree.get_path(requantized, untouched) is jpeft.tree.get_path(qparams, untouched)


def test_methods_that_cannot_use_a_quantized_base_say_so(model_and_params):
    _, params = model_and_params
    qparams = quantize_params(params)
    pissa = jpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="decomposes the base weight, which is 4-bit quantized"):
        jpeft.init_adapter(qparams, pissa, key=jax.random.key(0))
    saved = jpeft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"])
    with pytest.raises(ValueError, match="o_proj.weight is a 4-bit quantized weight"):
        jpeft.init_adapter(qparams, saved, key=jax.random.key(0))


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = random_causal_lm("LlamaConfig", {k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    hf.save_pretrained(path, safe_serialization=True)
    return path


def with_config(src, dst, **edits):
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **edits}))
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


def test_quantize_while_loading_equals_quantizing_the_loaded_params(float_checkpoint):
    model, qparams = jpeft.models.from_pretrained(float_checkpoint, quantize="fp4", blocksize=32)
    _, params = jpeft.models.from_pretrained(float_checkpoint)
    expected = quantize_params(params, QuantConfig("fp4", 32))
    for path in quantized_paths(expected):
        ours, theirs = (jpeft.tree.get_path(t, path) for t in (qparams, expected))
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), ours, theirs))
    assert quantized_paths(qparams) == quantized_paths(expected)


def test_loading_errors(float_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="quant_type must be one of"):
        jpeft.models.from_pretrained(float_checkpoint, quantize="int4")
    gptq = with_config(float_checkpoint, tmp_path, quantization_config={"quant_method": "gptq"})
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        jpeft.models.from_pretrained(gptq)
    eight_bit = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with_config(float_checkpoint, tmp_path, quantization_config=eight_bit)
    with pytest.raises(ValueError, match="8-bit checkpoint"):
        jpeft.models.from_pretrained(tmp_path)
