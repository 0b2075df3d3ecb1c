"""The same checks for every registered method: a new method file gets them for free.

Each method's config comes from its registry entry (`Method.job_config`, as `jpeft finetune`
builds it) on a tiny Llama with a word-level tokenizer. Weight methods: a fresh adapter keeps the
logits; apply equals merge and unmerge restores the weights; save/load keeps the logits and
writes the method's peft_type; a train step changes the trainable leaves only, compiles once, and
gives the same losses on a (2, 2, 2) mesh; the CLI job runs.
Compatibility with PEFT itself is tested per method in tests/parity/.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import save_word_level_llama

import jpeft
from jpeft import cli
from jpeft.method import JobSpec, WeightMethod, config_from_dict, method_for

METHODS = sorted(jpeft.registered())
TOL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(checkpoint dir, model, params, input ids [4, 6])."""
    path = save_word_level_llama(tmp_path_factory.mktemp("tiny"))
    model, params = jpeft.models.from_pretrained(path)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (4, 6)).astype(np.int32)
    return path, model, params, jnp.asarray(ids)


def job_spec(path, model, steps: int = 20) -> JobSpec:
    return JobSpec(
        model_type=model.config.model_type,
        num_layers=model.config.num_hidden_layers,
        train_layers=None,
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=None,
        virtual_tokens=3,
        instruction="market vote film",
        model_path=str(path),
        steps=steps,
        common=dict(task_type="CAUSAL_LM"),
    )


def fresh(base, name: str) -> jpeft.Adapter:
    path, model, params, _ = base
    config = jpeft.registered()[name].job_config(job_spec(path, model))
    return jpeft.init_adapter(params, config, key=jax.random.key(0), model=model)


def perturbed(adapter: jpeft.Adapter, scale: float = 0.2) -> jpeft.Adapter:
    """Every trainable leaf moved away from its init (relative to its size, plus noise)."""
    trainable, frozen = jpeft.partition(adapter)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    moved = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jpeft.combine(jax.tree.unflatten(treedef, moved), frozen)


def logits(base, adapter=None, params=None) -> np.ndarray:
    _, model, base_params, ids = base
    return np.asarray(model.apply(base_params if params is None else params, ids, adapter=adapter))


def is_weight_method(name: str) -> bool:
    return isinstance(jpeft.registered()[name], WeightMethod)


@pytest.mark.parametrize("name", METHODS)
def test_config_json_round_trip(base, name):
    config = fresh(base, name).config
    data = json.loads(json.dumps(config.to_dict()))
    assert data["peft_type"] == jpeft.registered()[name].peft_type
    again = config_from_dict(data)
    assert again == config and hash(again) == hash(config)
    assert type(config).__name__ in jpeft.__all__ and getattr(jpeft, type(config).__name__)


@pytest.mark.parametrize("name", [m for m in METHODS if is_weight_method(m)])
def test_fresh_weight_adapter_keeps_the_logits(base, name):
    np.testing.assert_allclose(logits(base, fresh(base, name)), logits(base), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", [m for m in METHODS if is_weight_method(m)])
def test_apply_equals_merge_and_unmerge_restores(base, name):
    _, _, params, _ = base
    adapter = perturbed(fresh(base, name))
    adapted = logits(base, adapter)
    assert np.abs(adapted - logits(base)).max() > 1e-3, "the perturbed adapter changes nothing"
    merged = jpeft.merge(params, adapter)
    np.testing.assert_allclose(logits(base, params=merged), adapted, atol=1e-4, rtol=0)
    try:
        restored = jpeft.unmerge(merged, adapter)
    except ValueError as err:  # a method may refuse unmerge, with the reason
        assert "unmerg" in str(err)
        return
    for path, leaf in jpeft.tree.flatten(params).items():
        np.testing.assert_allclose(
            jpeft.tree.flatten(restored)[path], leaf, atol=1e-5, rtol=0, err_msg=path
        )


@pytest.mark.parametrize("name", [m for m in METHODS if not is_weight_method(m)])
def test_prompt_adapters_cannot_be_merged(base, name):
    _, _, params, _ = base
    with pytest.raises(ValueError, match="cannot merge"):
        jpeft.merge(params, fresh(base, name))


@pytest.mark.parametrize("name", METHODS)
def test_save_load_keeps_the_logits(base, name, tmp_path):
    _, _, params, _ = base
    adapter = perturbed(fresh(base, name))
    jpeft.save_pretrained(adapter, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == jpeft.registered()[name].peft_type
    loaded = jpeft.load_pretrained(tmp_path, params=params)
    assert method_for(loaded.config) is jpeft.registered()[name]
    np.testing.assert_allclose(logits(base, loaded), logits(base, adapter), atol=TOL, rtol=0)


def train(base, adapter, mesh=None, steps: int = 2) -> tuple[list[float], jpeft.Adapter, object]:
    """(losses, adapter, step) after `steps` Adam steps of the library's train step, on `mesh`
    or one device."""
    _, model, params, ids = base
    adapter = jax.tree.map(jnp.copy, adapter)  # the step donates its adapter
    optimizer = optax.adam(1e-2)
    batch = {"input_ids": ids, "labels": ids}
    shardings = None
    if mesh is None:
        opt_state = jpeft.train.init_opt_state(optimizer, jpeft.partition(adapter)[0])
    else:
        shardings = jpeft.sharding.step_shardings(mesh, params, adapter, optimizer)
        params = jpeft.sharding.shard(params, mesh)
        adapter = jpeft.sharding.shard(adapter, mesh, like=params)
        opt_state = jpeft.sharding.init_optimizer(optimizer, jpeft.partition(adapter)[0])
        batch = jpeft.sharding.shard_batch(batch, mesh)
    step = jpeft.train.make_train_step(model, optimizer, shardings=shardings)
    losses = []
    for _ in range(steps):
        adapter, opt_state, loss = step(params, adapter, opt_state, batch, None)
        losses.append(float(loss))
    return losses, adapter, step


@pytest.mark.parametrize("name", METHODS)
def test_train_step_moves_only_the_adapter_and_shards(base, name):
    """One device: the step compiles once, moves trainable leaves only, keeps params and frozen
    state. On a (data, fsdp, model) = (2, 2, 2) mesh (params, adapter and optimizer state, the
    method's own training state included, placed by the rules): the same losses."""
    _, _, params, _ = base
    adapter = perturbed(fresh(base, name))
    params_before = jax.tree.map(np.array, params)
    single, trained, step = train(base, adapter)
    assert all(np.isfinite(single)) and step._cache_size() == 1
    jax.tree.map(np.testing.assert_array_equal, params, params_before)
    (before, frozen_before), (after, frozen_after) = (
        jpeft.partition(adapter),
        jpeft.partition(trained),
    )
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen_before)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), after, before)
    assert any(jax.tree.leaves(moved)), "no trainable leaf moved"

    mesh = jpeft.sharding.make_mesh(data=2, fsdp=2, model=2)
    np.testing.assert_allclose(train(base, adapter, mesh)[0], single, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_cli_job_trains_and_saves_the_method(base, name, tmp_path):
    path = base[0]
    data = tmp_path / "topics.csv"
    data.write_text("text,label\n" + "\n".join(f"market bank {i % 3},money" for i in range(24)))
    out = tmp_path / "run"
    args = ["finetune", "--model", str(path), "--data", str(data), "--output-dir", str(out)]
    args += ["--method", name, "--steps", "3", "--batch-size", "4", "--seq-len", "24"]
    args += ["--test-size", "4", "--eval-batch-size", "4", "--r", "4", "--virtual-tokens", "3"]
    args += ["--warmup-steps", "1"]
    assert cli.main(args) == 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == jpeft.registered()[name].peft_type
    assert len(json.loads((out / "metrics.json").read_text())["loss"]) == 3


def test_unknown_methods_are_errors():
    with pytest.raises(ValueError, match="no jpeft method is registered for peft_type 'NOPE'"):
        method_for("NOPE")
    with pytest.raises(ValueError, match="unknown peft_type 'NOPE'"):
        config_from_dict({"peft_type": "NOPE"})
