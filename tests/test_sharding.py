"""jpeft.sharding on 8 CPU devices (see conftest.py): meshes, rules, adapter specs derived from the
base, 4-bit weights split in whole blocks, sharded training equal to one device, the memory
estimate against the compiled step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from tiny_models import random_causal_lm

import jpeft
from jpeft import sharding as js
from jpeft.models.llama import LlamaForCausalLM, ModelConfig
from jpeft.quant import QuantConfig, dequantize, quantize_params

CONFIG = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
MODEL = LlamaForCausalLM(CONFIG)
MESH_SHAPE = dict(data=2, fsdp=2, model=2)
ADAPTERS = {
    "lora": jpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "dora": jpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
    "ia3": jpeft.IA3Config(),
    "prompt_tuning": jpeft.PromptTuningConfig(num_virtual_tokens=4),
}


@pytest.fixture(scope="module")
def params():
    return MODEL.init(jax.random.key(0))


@pytest.fixture(scope="module")
def mesh():
    return js.make_mesh(**MESH_SHAPE)


def batch_of(size: int = 8, seq: int = 16, vocab: int = CONFIG.vocab_size) -> dict:
    ids = np.random.default_rng(0).integers(0, vocab, (size, seq)).astype(np.int32)
    return {"input_ids": ids, "labels": ids}


def test_make_mesh_fills_one_axis_and_checks_the_device_count():
    mesh = js.make_mesh(data=2, fsdp=-1, model=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert set(mesh.axis_types) == {AxisType.Auto}
    with pytest.raises(ValueError, match="covers 4 devices but there are 8"):
        js.make_mesh(data=2, fsdp=2, model=1)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        js.make_mesh(data=3, fsdp=-1)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        js.make_mesh(data=-1, fsdp=-1)
    assert js.parse_mesh("data=2, fsdp=-1") == {"data": 2, "fsdp": -1}
    with pytest.raises(ValueError, match="expected AXIS=SIZE"):
        js.parse_mesh("tensor=2")


def test_rules_split_heads_and_mlp_and_replicate_what_does_not_divide(params, mesh):
    specs = js.param_specs(params, mesh)
    layers = specs["model"]["layers"]
    assert layers["self_attn"]["q_proj"]["weight"] == P(None, "model", "fsdp")
    assert layers["self_attn"]["o_proj"]["weight"] == P(None, "fsdp", "model")
    assert layers["mlp"]["down_proj"]["weight"] == P(None, "fsdp", "model")
    assert layers["input_layernorm"]["weight"] == P(None, None)
    assert specs["lm_head"]["weight"] == P("model", "fsdp")

    odd = LlamaForCausalLM(ModelConfig(**{**CONFIG.__dict__, "vocab_size": 99}))
    odd_specs = js.param_specs(jax.eval_shape(odd.init, jax.random.key(0)), mesh)
    assert odd_specs["lm_head"]["weight"] == P(None, "fsdp")  # 99 rows do not split 2 ways

    rules = [(r"q_proj\.weight$", (None, "model")), *js.LLAMA_RULES]
    custom = js.param_specs(params, mesh, rules)
    assert custom["model"]["layers"]["self_attn"]["q_proj"]["weight"] == P(None, None, "model")
    with pytest.raises(ValueError, match="gives 1 dims"):
        js.param_specs(params, mesh, [(r"q_proj\.weight$", ("model",))])


def test_adapter_dims_follow_the_base_dims_they_run_along(params, mesh):
    dora = jpeft.init_adapter(
        params,
        jpeft.LoraConfig(
            r=4, target_modules="all-linear", use_dora=True, modules_to_save=["lm_head"]
        ),
        key=jax.random.key(1),
    )
    placed = js.shard(dora, mesh, like=js.shard(params, mesh))
    q = placed.weights["model.layers.0.self_attn.q_proj"]  # W [out, in]: ("model", "fsdp")
    assert q["lora_A.weight"].sharding.spec == P(None, "fsdp")
    assert q["lora_B.weight"].sharding.spec == P("model", None)
    assert q["lora_magnitude_vector"].sharding.spec == P("model")
    down = placed.weights["model.layers.1.mlp.down_proj"]  # W [out, in]: ("fsdp", "model")
    assert down["lora_A.weight"].sharding.spec == P(None, "model")
    assert down["lora_B.weight"].sharding.spec == P("fsdp", None)
    assert placed.overrides["lm_head.weight"].sharding.spec == P("model", "fsdp")

    ia3 = jpeft.init_adapter(params, jpeft.IA3Config(), key=jax.random.key(1), model=MODEL)
    specs = js.adapter_specs(ia3, params, mesh)
    assert specs.weights["model.layers.0.self_attn.k_proj"]["ia3_l"] == P("model", None)
    assert specs.weights["model.layers.0.mlp.down_proj"]["ia3_l"] == P(None, "model")

    prompt = jpeft.init_adapter(
        params, ADAPTERS["prompt_tuning"], key=jax.random.key(1), model=MODEL
    )
    assert set(jax.tree.leaves(js.adapter_specs(prompt, params, mesh))) == {P()}
    with pytest.raises(ValueError, match="like=params"):
        js.shard(dora, mesh)


def test_4bit_weights_split_in_whole_blocks_along_the_output_rows(params, mesh):
    quantized = quantize_params(params, QuantConfig("nf4", double_quant=True))
    placed = js.shard(quantized, mesh)
    original = quantized["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    q = placed["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    assert q.packed.sharding.spec == P(None, ("model", "fsdp"))
    assert q.absmax.sharding.spec == P(None, ("model", "fsdp"))
    assert q.nested_absmax.sharding.spec == P()
    row_bytes, block_bytes = q.weight_shape[1] // 2, q.blocksize // 2
    for shard in q.packed.addressable_shards:
        start, stop = shard.index[1].start, shard.index[1].stop
        assert start % row_bytes == 0 and (stop - start) % block_bytes == 0
        np.testing.assert_array_equal(shard.data, np.asarray(original.packed)[shard.index])
    np.testing.assert_array_equal(
        jax.jit(lambda w: dequantize(w, jnp.float32))(q), dequantize(original, jnp.float32)
    )
    # one 4096-element block per weight: no split keeps whole blocks, so it is replicated
    coarse = js.param_specs(quantize_params(params, QuantConfig("nf4", blocksize=4096)), mesh)
    assert coarse["model"]["layers"]["self_attn"]["q_proj"]["weight"].packed == P(None, None)


def train_losses(params, config, mesh=None, steps=3, remat=None) -> list[float]:
    """Losses of `steps` AdamW steps with the library's train step, on `mesh` or one device."""
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(1), model=MODEL)
    optimizer = optax.adamw(1e-2)
    batch = batch_of()
    if mesh is None:
        opt_state = optimizer.init(jpeft.partition(adapter)[0])
        step = jpeft.train.make_train_step(MODEL, optimizer, remat=remat)
    else:
        shardings = js.step_shardings(mesh, params, adapter, optimizer)
        params = js.shard(params, mesh)
        adapter = js.shard(adapter, mesh, like=params)
        opt_state = js.init_optimizer(optimizer, jpeft.partition(adapter)[0])
        step = jpeft.train.make_train_step(MODEL, optimizer, shardings=shardings, remat=remat)
        batch = js.shard_batch(batch, mesh)
    losses = []
    for _ in range(steps):
        adapter, opt_state, loss = step(params, adapter, opt_state, batch, None)
        losses.append(float(loss))
    if mesh is not None:
        expected = js.shardings(adapter, mesh, like=params)
        assert [x.sharding for x in jax.tree.leaves(adapter)] == jax.tree.leaves(expected)
    return losses


# Every method trains on a mesh in tests/test_conformance.py; these repeat it with more steps.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "method",
    ["lora", pytest.param("dora", marks=SLOW), pytest.param("ia3", marks=SLOW), "qlora"]
    + [pytest.param("prompt_tuning", marks=SLOW)],
)
def test_training_on_a_2x2x2_mesh_gives_the_single_device_losses(params, mesh, method):
    if method == "qlora":
        params = quantize_params(params, QuantConfig("nf4", double_quant=True))
    config = ADAPTERS["lora" if method == "qlora" else method]
    single = train_losses(params, config)
    assert single[-1] < single[0]
    np.testing.assert_allclose(train_losses(params, config, mesh), single, rtol=1e-4)


@pytest.mark.slow
def test_remat_keeps_the_losses(params, mesh):
    expected = train_losses(params, ADAPTERS["lora"], mesh, steps=2)
    for remat in ("dots", "full"):
        got = train_losses(params, ADAPTERS["lora"], mesh, steps=2, remat=remat)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_batch_that_does_not_split_is_refused(mesh):
    with pytest.raises(ValueError, match="multiple of 4"):
        js.shard_batch(batch_of(size=6), mesh)


def test_gather_gives_whole_arrays(params, mesh):
    placed = js.shard(params, mesh)
    whole = js.gather(placed)
    weight = whole["model"]["layers"]["mlp"]["up_proj"]["weight"]
    assert weight.is_fully_replicated
    np.testing.assert_array_equal(weight, params["model"]["layers"]["mlp"]["up_proj"]["weight"])


@pytest.mark.parametrize("remat", [None, "dots", "full"])
def test_memory_estimate_matches_the_compiled_step(mesh, remat):
    config = ModelConfig(**{**CONFIG.__dict__, "hidden_size": 128, "intermediate_size": 512})
    batch, seq, lora = 8, 128, ADAPTERS["lora"]
    plan = dict(adapter_config=lora, dtype="float32", remat=remat)
    measured = jpeft.memory.compiled_step_memory(config, mesh, batch, seq, **plan)
    estimate = jpeft.memory.estimate_memory(config, mesh, batch, seq, **plan)
    batch_bytes = 2 * batch * seq * 4 // js.batch_size_multiple(mesh)
    state = estimate.weights + estimate.adapter + estimate.optimizer + batch_bytes
    assert abs(measured.argument_size_in_bytes - state) <= 0.01 * state
    assert 0.7 <= measured.temp_size_in_bytes / estimate.activations <= 1.4
    planned = jpeft.memory.estimate_memory(config, MESH_SHAPE, batch, seq, **plan)
    assert planned == estimate  # planning from axis sizes alone, no devices needed


def test_compiled_step_memory_of_a_4bit_base_counts_its_codes(mesh):
    config = ModelConfig(**{**CONFIG.__dict__, "hidden_size": 128, "intermediate_size": 512})
    plan = dict(adapter_config=ADAPTERS["lora"], dtype="float32")
    float_base = jpeft.memory.compiled_step_memory(config, mesh, 8, 64, **plan)
    nf4_base = jpeft.memory.compiled_step_memory(config, mesh, 8, 64, quantize="nf4", **plan)
    estimate = jpeft.memory.estimate_memory(config, mesh, 8, 64, quantize="nf4", **plan)
    state = estimate.weights + estimate.adapter + estimate.optimizer + 2 * 8 * 64 * 4 // 4
    assert abs(nf4_base.argument_size_in_bytes - state) <= 0.01 * state
    assert nf4_base.argument_size_in_bytes < 0.5 * float_base.argument_size_in_bytes


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_loading_onto_a_mesh_puts_each_tensor_on_its_shards(tmp_path, mesh, quantize):
    sizes = {k: getattr(CONFIG, k) for k in ("vocab_size", "hidden_size", "intermediate_size")}
    layout = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    random_causal_lm("LlamaConfig", {**sizes, **layout}).save_pretrained(tmp_path)
    _, whole = jpeft.models.from_pretrained(tmp_path, quantize=quantize)
    _, placed = jpeft.models.from_pretrained(tmp_path, quantize=quantize, mesh=mesh)
    expected = jax.tree.leaves(js.shardings(whole, mesh))
    for got, want, sharding in zip(
        jax.tree.leaves(placed), jax.tree.leaves(whole), expected, strict=True
    ):
        assert got.sharding == sharding
        np.testing.assert_array_equal(got, want)


def test_generation_with_sharded_params_and_adapter_gives_the_same_tokens(params, mesh):
    adapter = jax.tree.map(
        lambda x: x + 0.05, jpeft.init_adapter(params, ADAPTERS["lora"], key=jax.random.key(1))
    )
    ids = batch_of(size=4, seq=6)["input_ids"]
    expected = MODEL.generate(params, ids, 5, adapter=adapter)
    placed = js.shard(params, mesh)
    got = MODEL.generate(placed, ids, 5, adapter=js.shard(adapter, mesh, like=placed))
    np.testing.assert_array_equal(got, expected)
