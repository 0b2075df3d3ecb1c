"""Mixed-adapter batches (`adapter_names=`) against PEFT, and mixed-adapter training.

Two LoRA adapters of different ranks and targets: PEFT's `model(ids, adapter_names=...)` logits
equal jpeft's; every row equals that row run alone with its own adapter (or none, "__base__"),
also in `generate` and on a 4-bit base. Training the bank: each adapter's gradient comes from its
own rows only and equals its gradient trained alone on them (scaled by its share of the tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from hf_bases import build_base, load_hf

import jpeft
from jpeft.mixed import mix, unmix
from jpeft.quant import QuantConfig, quantize_params
from jpeft.train import causal_lm_objective

TOL = 1e-4
SOURCES = {
    "one": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "two": dict(r=2, lora_alpha=8, target_modules=["v_proj", "up_proj", "lm_head"]),
}
ROWS = ["one", "two", "__base__", "two", "one"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, params, ids [5, 9], {name: jpeft Adapter}, PEFT's mixed logits)."""
    root = tmp_path_factory.mktemp("mixed")
    path, model, params, _ = build_base("llama", root / "base")
    ids = np.random.default_rng(4).integers(0, 96, (len(ROWS), 9))
    names = list(SOURCES)
    peft_model = peft.get_peft_model(
        load_hf(path), peft.LoraConfig(**SOURCES[names[0]]), adapter_name=names[0]
    )
    peft_model.add_adapter(names[1], peft.LoraConfig(**SOURCES[names[1]]))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_" in key:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(torch.tensor(ids), adapter_names=ROWS).logits.numpy()
    peft_model.save_pretrained(root / "peft")
    adapters = {name: jpeft.load_pretrained(root / "peft" / name) for name in names}
    return model, params, ids, adapters, expected


def alone(model, params, ids, adapters, names, **kwargs):
    """Each row run on its own with its adapter: [rows, ...] stacked."""
    outs = []
    for row, name in enumerate(names):
        adapter = None if name == "__base__" else adapters[name]
        outs.append(np.asarray(model.apply(params, ids[row : row + 1], adapter=adapter, **kwargs)))
    return np.concatenate(outs)


def test_mixed_logits_match_peft_and_each_row_alone(setup):
    model, params, ids, adapters, expected = setup
    got = np.asarray(model.apply(params, jnp.asarray(ids), adapter=adapters, adapter_names=ROWS))
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(got, alone(model, params, ids, adapters, ROWS), atol=1e-5, rtol=0)
    base = np.asarray(model.apply(params, jnp.asarray(ids)))
    np.testing.assert_allclose(got[2], base[2], atol=1e-6, rtol=0)  # "__base__"
    assert np.abs(got[0] - base[0]).max() > 100 * TOL


def test_mixed_generate_equals_each_row_alone(setup):
    model, params, ids, adapters, _ = setup
    got = np.asarray(model.generate(params, ids, 4, adapter=adapters, adapter_names=ROWS))
    for row, name in enumerate(ROWS):
        adapter = None if name == "__base__" else adapters[name]
        want = np.asarray(model.generate(params, ids[row : row + 1], 4, adapter=adapter))
        np.testing.assert_array_equal(got[row], want[0], err_msg=name)


def test_mixed_batch_on_a_four_bit_base(setup):
    model, params, ids, adapters, _ = setup
    qparams = quantize_params(params, QuantConfig("nf4", 32))
    got = np.asarray(model.apply(qparams, jnp.asarray(ids), adapter=adapters, adapter_names=ROWS))
    np.testing.assert_allclose(got, alone(model, qparams, ids, adapters, ROWS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("base", ["float", "nf4"])
def test_mixed_training_gradients_are_each_adapters_own(setup, base):
    """d loss(bank) / d bank[a] = (a's share of the tokens) d loss_a(a alone on its rows), on a
    float and on a 4-bit base."""
    model, params, ids, adapters, _ = setup
    if base == "nf4":
        params = quantize_params(params, QuantConfig("nf4", 32))
    bank = mix(adapters, ROWS)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
    trainable, frozen = jpeft.partition(bank)

    def mixed_loss(trainable):
        return causal_lm_objective(model, params, jpeft.combine(trainable, frozen), batch, None)

    grads = unmix(jpeft.combine(jax.grad(mixed_loss)(trainable), frozen))
    for name, adapter in adapters.items():
        rows = [i for i, n in enumerate(ROWS) if n == name]
        own = {k: v[np.asarray(rows)] for k, v in batch.items()}
        own_trainable, own_frozen = jpeft.partition(adapter)

        def own_loss(t, own=own, own_frozen=own_frozen):
            return causal_lm_objective(model, params, jpeft.combine(t, own_frozen), own, None)

        want = jax.grad(own_loss)(own_trainable)
        share = len(rows) / len(ROWS)  # every row has the same number of predicted tokens
        for module, pieces in want.weights.items():
            for piece, value in pieces.items():
                np.testing.assert_allclose(
                    np.asarray(grads[name].weights[module][piece]),
                    share * np.asarray(value),
                    rtol=1e-4,
                    atol=1e-7,
                    err_msg=f"{name} {module} {piece}",
                )


@pytest.mark.slow
def test_mixed_training_on_a_mesh_gives_the_same_losses(setup):
    """Two Adam steps of the library's train step on the bank, on one device and on a
    (data, fsdp, model) = (2, 2, 2) mesh."""
    model, params, ids, adapters, _ = setup
    names, batch = ROWS[:4], {"input_ids": jnp.asarray(ids[:4]), "labels": jnp.asarray(ids[:4])}
    optimizer = optax.adam(1e-2)

    def losses(mesh):
        bank, step_params, step_batch, shardings = mix(adapters, names), params, batch, None
        if mesh is not None:
            shardings = jpeft.sharding.step_shardings(mesh, params, bank, optimizer)
            step_params = jpeft.sharding.shard(params, mesh)
            bank = jpeft.sharding.shard(bank, mesh, like=step_params)
            step_batch = jpeft.sharding.shard_batch(batch, mesh)
        opt_state = optimizer.init(jpeft.partition(bank)[0])
        step = jpeft.train.make_train_step(model, optimizer, shardings=shardings)
        out = []
        for _ in range(2):
            bank, opt_state, loss = step(step_params, bank, opt_state, step_batch, None)
            out.append(float(loss))
        return out

    single = losses(None)
    assert single[1] < single[0]
    mesh = jpeft.sharding.make_mesh(data=2, fsdp=2, model=2)
    np.testing.assert_allclose(losses(mesh), single, rtol=1e-4)


def test_bank_round_trip_and_select(setup):
    _, _, _, adapters, _ = setup
    bank = mix(adapters, ROWS)
    back = unmix(bank)
    for name, adapter in adapters.items():
        for module, pieces in adapter.weights.items():
            for piece, value in pieces.items():
                np.testing.assert_array_equal(back[name].weights[module][piece], value)
    swapped = bank.select(["two"] * 3)
    assert np.asarray(swapped.frozen["base_model"]["adapter_rows"]).tolist() == [1, 1, 1]


@pytest.mark.parametrize(
    "names, change, match",
    [
        (["one", "three"], {}, r"\['three'\], which are not among the adapters"),
        ("one", {}, "one name per row"),
        (["one"] * 5, dict(use_dora=True), "uses DoRA"),
        (["one"] * 5, dict(target_modules=["embed_tokens"]), "embedding table"),
        (["one"] * 3, {}, "the batch has 5 rows but adapter_names names 3"),
    ],
)
def test_what_cannot_be_mixed(setup, names, change, match):
    model, params, ids, adapters, _ = setup
    if change:
        config = jpeft.LoraConfig(**{**SOURCES["one"], **change})
        adapters = {**adapters, "one": jpeft.init_adapter(params, config, key=jax.random.key(0))}
    with pytest.raises(ValueError, match=match):
        model.apply(params, jnp.asarray(ids), adapter=adapters, adapter_names=names)
