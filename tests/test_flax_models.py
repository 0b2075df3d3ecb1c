"""PEFT on Flax models jpeft did not write (`jpeft.flax.linen`, `jpeft.flax.nnx`).

Every registered weight method on a linen and an NNX model (tests/flax_toy_models.py: Embed,
Conv, scanned DenseGeneral / Einsum / LayerNorm / Dense blocks, a Dense head): the adapted
model's output equals the unmodified model's on the merged params, unmerge gives the params
back, a fresh adapter changes nothing. Then the properties a training loop relies on (only
adapter-sized gradients, 4-bit kernels through the quantized matmul), clear errors, and two real
third-party models from PyPI: recurrentgemma's Griffin (linen) and tunix's Llama 3 (NNX).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax_toy_models import VOCAB, LinenModel, NnxModel

import jpeft
from jpeft.flax import linen as peft_linen
from jpeft.flax import nnx as peft_nnx
from jpeft.method import JobSpec, WeightMethod
from jpeft.quant.params import QuantConfig
from jpeft.sharding import placement

WEIGHT_METHODS = sorted(n for n, m in jpeft.registered().items() if isinstance(m, WeightMethod))
# The methods the fast suite runs on both frameworks; the rest run with `-m slow`.
FAST = {"lora", "ia3", "vera", "trainable-tokens"}
TARGETS = ["q", "o", "up", "down", "conv"]


class Toy:
    """One framework's toy model: `peft`, its params (`variables` / `state`), `plain(params)`
    the unmodified model's logits."""

    def __init__(self, framework: str):
        self.ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 5)), jnp.int32)
        if framework == "linen":
            module = LinenModel()
            self.params = module.init(jax.random.key(0), self.ids)
            self.peft = peft_linen.PeftModel(module, self.params, self.ids)
            self.plain = lambda params: module.apply(params, self.ids)
        else:
            model = NnxModel(nnx.Rngs(0))
            graphdef, self.params = nnx.split(model)
            self.peft = peft_nnx.PeftModel(model)
            self.plain = lambda state: nnx.merge(graphdef, state)(self.ids)

    def adapted(self, adapter, params=None):
        return self.peft.apply(self.params if params is None else params, self.ids, adapter=adapter)


@pytest.fixture(scope="module", params=["linen", "nnx"])
def toy(request):
    return Toy(request.param)


def method_config(name: str):
    if name == "trainable-tokens":
        return jpeft.TrainableTokensConfig(target_modules=["embed"], token_indices=[1, 2, 3])
    spec = JobSpec("toy", 2, None, 4, 8, 0.0, TARGETS, 3, "", "", 20)
    return jpeft.registered()[name].job_config(spec)


def perturbed(adapter):
    """Every trainable float leaf moved away from its init."""
    trainable, frozen = jpeft.partition(adapter)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    moved = [
        x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating)
        else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jpeft.combine(jax.tree.unflatten(treedef, moved), frozen)


def close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max())), rtol=0)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in WEIGHT_METHODS]
)
def test_every_weight_method_adapts_merges_and_unmerges(toy, name):
    fresh = toy.peft.init_adapter(toy.params, method_config(name), key=jax.random.key(1))
    base = toy.plain(toy.params)
    close(toy.adapted(fresh), base)
    adapter = perturbed(fresh)
    adapted = toy.adapted(adapter)
    assert np.abs(np.asarray(adapted - base)).max() > 1e-3, "the adapter changes nothing"
    merged = toy.peft.merge(toy.params, adapter)
    close(toy.plain(merged), adapted)
    try:
        restored = toy.peft.unmerge(merged, adapter)
    except ValueError as err:  # DoRA / LN tuning refuse, saying why
        assert "unmerg" in str(err)
        return
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(toy.params), strict=True):
        close(got, want)


def test_names_follow_module_paths_with_the_layer_index_after_the_stack(toy):
    names = {site.module_name(layer) for site in toy.peft.sites for layer in site.layers()}
    assert {"embed", "conv", "lm_head", "layers.0.q", "layers.1.o", "layers.1.down"} <= names
    assert toy.peft.output_head == "lm_head"
    adapter = toy.peft.init_adapter(
        toy.params, jpeft.LoraConfig(target_modules="all-linear"), key=jax.random.key(0)
    )
    assert "lm_head" not in adapter.weights and "embed" not in adapter.weights
    assert "layers.1.q" in adapter.weights and "conv" in adapter.weights
    # PEFT's orientation: A [r, in], B [out, r], `in` of a DenseGeneral's kernel flattened
    assert adapter.weights["layers.0.o"]["lora_A.weight"].shape == (8, 16)
    assert adapter.weights["layers.0.q"]["lora_B.weight"].shape == (16, 8)
    layer_one = toy.peft.init_adapter(
        toy.params,
        jpeft.LoraConfig(target_modules=["q"], layers_to_transform=[1], layers_pattern="layers"),
        key=jax.random.key(0),
    )
    assert sorted(layer_one.weights) == ["layers.1.q"]
    saved = perturbed(
        toy.peft.init_adapter(
            toy.params,
            jpeft.LoraConfig(target_modules=["up"], modules_to_save=["lm_head"]),
            key=jax.random.key(0),
        )
    )
    assert sorted(saved.overrides) == ["lm_head.bias", "lm_head.weight"]
    close(toy.plain(toy.peft.merge(toy.params, saved)), toy.adapted(saved))


def test_training_gradients_are_adapter_sized_and_move_only_the_adapter(toy):
    config = jpeft.LoraConfig(r=2, target_modules=["q", "up", "conv"], lora_dropout=0.1)
    adapter = toy.peft.init_adapter(toy.params, config, key=jax.random.key(0))
    optimizer = optax.adam(1e-2)

    def loss(adapter, params, key):
        logits = toy.peft.apply(params, toy.ids, adapter=adapter, dropout_key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, toy.ids).mean()

    @jax.jit
    def step(adapter, opt_state, params, key):
        value, grads = jax.value_and_grad(loss)(adapter, params, key)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(adapter, updates), opt_state, value

    key = jax.random.key(3)
    lowered = jax.jit(jax.grad(loss)).lower(adapter, toy.params, key).as_text()
    kernels = {"16x32", "32x16"}  # up's kernel and its [out, in] view: never formed as a gradient
    results = re.findall(r"stablehlo\.dot_general .*tensor<([0-9x]+)xf32>$", lowered, re.M)
    assert results and not kernels & set(results), "a kernel-sized gradient was formed"
    opt_state = optimizer.init(adapter)
    values = []
    for i in range(6):
        adapter, opt_state, value = step(adapter, opt_state, toy.params, jax.random.fold_in(key, i))
        values.append(float(value))
    assert values[-1] < values[0], values


def test_4bit_kernels_run_the_quantized_matmul_and_merge(toy):
    quantized = toy.peft.quantize(toy.params, QuantConfig(skip_modules=()))  # the head too
    adapter = perturbed(
        toy.peft.init_adapter(
            quantized, jpeft.LoraConfig(target_modules=["up"]), key=jax.random.key(0)
        )
    )
    adapted = toy.adapted(adapter, quantized)
    close(toy.plain(toy.peft.merge(quantized, adapter)), adapted)
    # the backward keeps the 4-bit codes, never a float [out, in] / kernel-shaped weight
    _, backward = jax.vjp(lambda a: toy.peft.apply(quantized, toy.ids, adapter=a), adapter)
    shapes = {np.shape(residual) for residual in jax.tree.leaves(backward)}  # what it keeps
    kernels = {(32, 16), (16, 32), (16, 16), (2, 32, 16), (2, 16, 32), (2, 16, 16), (2, 2, 8, 16)}
    assert not shapes & kernels, shapes


def test_errors_name_the_layer_and_what_to_do(toy):
    with pytest.raises(ValueError, match=r"matched no module.*'q'.*'up'"):
        toy.peft.init_adapter(
            toy.params, jpeft.LoraConfig(target_modules=["qq"]), key=jax.random.key(0)
        )
    other = jpeft.Adapter(
        jpeft.LoraConfig(r=1),
        {
            "model.layers.0.q_proj": {
                "lora_A.weight": jnp.zeros((1, 16)),
                "lora_B.weight": jnp.zeros((16, 1)),
            }
        },
    )
    with pytest.raises(ValueError, match="another model"):
        toy.adapted(other)
    with pytest.raises(ValueError, match="PROMPT_TUNING adds virtual tokens.*weight methods"):
        toy.peft.init_adapter(
            toy.params, jpeft.PromptTuningConfig(num_virtual_tokens=2), key=jax.random.key(0)
        )


def test_layers_jpeft_cannot_adapt_are_refused_with_the_reason():
    import flax.linen as nn

    class PerHead(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8, name="proj")(x).reshape(*x.shape[:-1], 2, 4)
            return nn.Einsum((2, 4, 4), "btnh,nhk->btnk", name="per_head")(x)

    class OwnEinsum(nn.Module):  # a projection written by hand: not a Flax layer
        @nn.compact
        def __call__(self, x):
            return jnp.einsum("btd,de->bte", x, self.param("w", nn.initializers.ones, (8, 8)))

    x = jnp.ones((1, 3, 8))
    for module, match in [
        (PerHead(), r"'per_head'.*batch axes.*exclude"),
        (OwnEinsum(), r"found no Flax Dense.*raw self.param"),
    ]:
        variables = module.init(jax.random.key(0), x)
        peft = peft_linen.PeftModel(module, variables, x)
        with pytest.raises(ValueError, match=match):
            peft.init_adapter(
                variables, jpeft.LoraConfig(target_modules=".*"), key=jax.random.key(0)
            )
    assert (
        "batch axes"
        in peft_linen.PeftModel(PerHead(), PerHead().init(jax.random.key(0), x), x).skipped[
            "per_head"
        ]
    )


# ---------------------------------------------------------------------------------------------
# real third-party models


def test_recurrentgemma_griffin_linen_lora_trains_and_merges():
    import recurrentgemma.jax as rg
    from recurrentgemma import common

    config = common.GriffinConfig(
        vocab_size=64,
        width=32,
        mlp_expanded_width=64,
        num_heads=2,
        lru_width=32,
        block_types=(common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=16,
        logits_soft_cap=30.0,
        scan_type=common.ScanType.LINEAR_NATIVE,
    )
    model = rg.Griffin(config, gradient_checkpointing=False)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    variables = model.init(jax.random.key(0), ids, pos)
    peft = peft_linen.PeftModel(model, variables, ids, pos, return_cache=False)
    lora = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj_q", "proj_k", "proj_v"])
    adapter = peft.init_adapter(variables, lora, key=jax.random.key(1))
    assert len(adapter.weights) == 3 and all(
        ".blocks.1." in n or n.startswith("blocks.1.") for n in adapter.weights
    )
    check_training(
        lambda a: peft.apply(variables, ids, pos, adapter=a, return_cache=False)[0],
        lambda merged: model.apply(merged, ids, pos, return_cache=False)[0],
        lambda a: peft.merge(variables, a),
        adapter,
        ids,
    )


class TunixLlama:
    """tunix's NNX Llama 3, tiny, random (its MLP kernels start at zero there: randomized)."""

    def __init__(self):
        from tunix.models.llama3 import model as llama3

        self.config = llama3.ModelConfig(
            num_layers=2,
            vocab_size=64,
            embed_dim=32,
            hidden_dim=64,
            num_heads=4,
            head_dim=8,
            num_kv_heads=2,
            rope_theta=10_000,
            norm_eps=1e-5,
        )
        model = llama3.Llama3(self.config, rngs=nnx.Rngs(0))
        kernels = nnx.state(model, nnx.Param)
        keys = iter(jax.random.split(jax.random.key(5), 64))
        nnx.update(
            model,
            jax.tree_util.tree_map_with_path(
                lambda path, x: (
                    0.2 * jax.random.normal(next(keys), x.shape) if "kernel" in str(path) else x
                ),
                kernels,
            ),
        )
        self.model = model
        self.ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
        self.pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
        self.mask = jnp.broadcast_to(jnp.tril(jnp.ones((8, 8), bool)), (2, 8, 8))

    def call_args(self):
        return self.ids, self.pos, None, self.mask


@pytest.fixture(scope="module")
def tunix():
    return TunixLlama()


def test_tunix_llama3_nnx_lora_trains_with_nnx_optimizer_and_merges(tunix):
    model = nnx.clone(tunix.model)  # its layers get wrapped in place below
    ids, pos, mask = tunix.ids, tunix.pos, tunix.mask
    peft = peft_nnx.PeftModel(model)
    graphdef, state = nnx.split(model)
    lora = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    adapter = peft.init_adapter(state, lora, key=jax.random.key(1))
    assert sorted(adapter.weights)[:2] == ["layers.0.mlp.down_proj", "layers.0.mlp.gate_proj"]
    check_training(
        lambda a: peft.apply(state, ids, pos, None, mask, adapter=a)[0],
        lambda merged: nnx.merge(graphdef, merged)(ids, pos, None, mask)[0],
        lambda a: peft.merge(state, a),
        adapter,
        ids,
    )
    # the stateful path: wrapped in place, nnx.Optimizer over the adapter's params only
    peft.inject(model, adapter)
    base_before = nnx.state(model, nnx.Not(peft_nnx.AdapterParam))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=peft_nnx.AdapterParam)

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            logits = model(ids, pos, None, mask)[0]
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], ids[:, 1:]
            ).mean()

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, peft_nnx.AdapterParam))(
            model
        )
        optimizer.update(model, grads)
        return value

    values = [float(step(model, optimizer)) for _ in range(4)]
    assert values[-1] < values[0], values
    for got, want in zip(
        jax.tree.leaves(nnx.state(model, nnx.Not(peft_nnx.AdapterParam))),
        jax.tree.leaves(base_before),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    trained = peft.adapter_of(model)
    close(
        peft.apply(state, ids, pos, None, mask, adapter=trained)[0], model(ids, pos, None, mask)[0]
    )


def check_training(adapted, plain_on, merge, adapter, ids, steps: int = 5):
    """LoRA training lowers the next-token loss, and the trained adapter's logits equal the
    unmodified model's on the merged params."""
    optimizer = optax.adam(1e-2)

    def loss(adapter):
        logits = adapted(adapter)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    @jax.jit
    def step(adapter, opt_state):
        value, grads = jax.value_and_grad(loss)(adapter)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(adapter, updates), opt_state, value

    opt_state = optimizer.init(adapter)
    values = []
    for _ in range(steps):
        adapter, opt_state, value = step(adapter, opt_state)
        values.append(float(value))
    assert values[-1] < values[0] - 1e-3, values
    close(plain_on(merge(adapter)), adapted(adapter))


# ---------------------------------------------------------------------------------------------
# sharding: the adapter's specs from the kernels' own annotations


def annotated_linen():
    import flax.linen as nn

    def split(*names):
        return nn.with_partitioning(nn.initializers.lecun_normal(), names)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.DenseGeneral((4, 4), kernel_init=split(None, "model", None), name="q")(x)
            x = x + q.reshape(*x.shape[:-1], 16)
            h = nn.Dense(32, kernel_init=split(None, "model"), name="up")(x)
            return x + nn.Dense(16, kernel_init=split("model", None), name="down")(h)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(VOCAB, 16, name="embed")(ids)
            for i in range(2):
                x = Block(name=f"block_{i}")(x)
            return nn.Dense(VOCAB, name="lm_head")(x)

    return Model()


class AnnotatedNnx(nnx.Module):
    def __init__(self, rngs):
        def split(*names):
            return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)

        self.embed = nnx.Embed(VOCAB, 16, rngs=rngs)
        self.q = nnx.LinearGeneral(16, (4, 4), kernel_init=split(None, "model", None), rngs=rngs)
        self.up = nnx.Linear(16, 32, kernel_init=split(None, "model"), rngs=rngs)
        self.down = nnx.Linear(32, 16, kernel_init=split("model", None), rngs=rngs)
        self.lm_head = nnx.Linear(16, VOCAB, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.q(x).reshape(*x.shape[:-1], 16)
        return self.lm_head(x + self.down(self.up(x)))


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_adapter_specs_follow_the_kernels_annotations_and_sharded_logits_match(framework):
    mesh = jpeft.sharding.make_mesh(data=2, fsdp=1, model=4)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (2, 6)), jnp.int32)
    if framework == "linen":
        module = annotated_linen()
        params = module.init(jax.random.key(0), ids)
        peft = peft_linen.PeftModel(module, params, ids)
        prefix = "block_0."
    else:
        with jax.set_mesh(mesh):
            model = AnnotatedNnx(nnx.Rngs(0))
        peft = peft_nnx.PeftModel(model)
        _, params = nnx.split(model)
        prefix = ""
    config = jpeft.LoraConfig(r=4, target_modules=["q", "up", "down"], init_lora_weights=False)
    adapter = peft.init_adapter(params, config, key=jax.random.key(1))
    specs = peft.adapter_specs(params, adapter, mesh)
    P = jax.sharding.PartitionSpec
    assert specs.weights[f"{prefix}q"] == {
        "lora_A.weight": P(None, None),
        "lora_B.weight": P("model", None),
    }  # heads: major
    assert specs.weights[f"{prefix}up"]["lora_B.weight"] == P("model", None)
    assert specs.weights[f"{prefix}down"]["lora_A.weight"] == P(None, "model")
    expected = peft.apply(params, ids, adapter=adapter)
    sharded = jax.device_put(adapter, placement.named(mesh, specs))
    assert sharded.weights[f"{prefix}up"]["lora_B.weight"].sharding.spec == P("model", None)
    logits = jax.jit(lambda p, a: peft.apply(p, ids, adapter=a))(params, sharded)
    close(logits, expected)


def test_tunix_llama3_adapter_exports_to_peft_on_transformers_and_back(tunix, tmp_path):
    """The module-name map makes jpeft's adapter a PEFT adapter for transformers' Llama holding
    the same weights, and a PEFT adapter made there an adapter of the tunix model."""
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    from jpeft.flax import rename

    peft = peft_nnx.PeftModel(tunix.model)
    _, state = nnx.split(tunix.model)
    hf = llama_with_tunix_weights(tunix, state)
    targets = ["gate_proj", "up_proj", "down_proj"]
    lora = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    adapter = peft.init_adapter(state, lora, key=jax.random.key(3))
    expected = peft.apply(state, *tunix.call_args(), adapter=adapter)[0]
    to_hf = [(r"^layers\.", "model.layers.")]
    jpeft.save_pretrained(rename(adapter, to_hf), tmp_path / "out")
    loaded = PeftModel.from_pretrained(hf, tmp_path / "out")
    with torch.no_grad():
        got = loaded(torch.from_numpy(np.asarray(tunix.ids, np.int64))).logits.numpy()
    close(got, expected, 1e-4)

    made_there = get_peft_model(
        llama_with_tunix_weights(tunix, state),
        LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False),
    )
    made_there.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = made_there(torch.from_numpy(np.asarray(tunix.ids, np.int64))).logits.numpy()
    back = rename(jpeft.load_pretrained(tmp_path / "peft"), [(r"^model\.layers\.", "layers.")])
    assert sorted(back.weights) == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    close(peft.apply(state, *tunix.call_args(), adapter=back)[0], want, 1e-4)
    assert isinstance(hf, transformers.LlamaForCausalLM)


def llama_with_tunix_weights(tunix, state):
    """transformers' LlamaForCausalLM holding the tunix model's weights."""
    import torch
    import transformers

    c = tunix.config
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.embed_dim,
            intermediate_size=c.hidden_dim,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            head_dim=c.head_dim,
            num_key_value_heads=c.num_kv_heads,
            rope_theta=c.rope_theta,
            rms_norm_eps=c.norm_eps,
            tie_word_embeddings=False,
            max_position_embeddings=64,
        )
    ).eval()
    params = state.to_pure_dict()
    dim = c.embed_dim
    tensors = {
        "model.embed_tokens.weight": params["embedder"]["input_embedding"],
        "model.norm.weight": params["final_norm"]["w"],
        "lm_head.weight": params["lm_head"]["w"].T,
    }
    for i in range(c.num_layers):
        layer, prefix = params["layers"][i], f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj"):
            tensors[f"{prefix}self_attn.{name}.weight"] = (
                layer["attn"][name]["w"].reshape(dim, -1).T
            )
        tensors[f"{prefix}self_attn.o_proj.weight"] = (
            layer["attn"]["o_proj"]["w"].reshape(-1, dim).T
        )
        for name in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"{prefix}mlp.{name}.weight"] = layer["mlp"][name]["kernel"].T
        tensors[f"{prefix}input_layernorm.weight"] = layer["input_layernorm"]["w"]
        tensors[f"{prefix}post_attention_layernorm.weight"] = layer["post_attention_layernorm"]["w"]
    hf.load_state_dict(
        {k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}, strict=True
    )
    return hf
