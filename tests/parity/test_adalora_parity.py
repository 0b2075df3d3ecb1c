"""AdaLoRA against PyTorch PEFT on tiny random transformers models.

Files both ways (logits, merged logits, keys, shapes, config fields); the orthogonality loss
against `AdaLoraModel.forward`; the rank allocator against PEFT's `RankAllocator`: the budget
schedule, the triplets kept from the same importance EMAs, and several steps of
`update_and_allocate` with hand-set gradients (E masks, rank_pattern, params); the pruned file
PEFT writes afterwards loads in jpeft with PEFT's logits and is written back unchanged.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from hf_bases import build_base, load_hf, perturb_torch, torch_logits
from safetensors.numpy import load_file

import jpeft
from jpeft.methods.adalora import allocate, budget_schedule, triplet_scores

TOL = 1e-4
# 3 layers x 3 modules at init_r 4: 36 triplets pruned to 18; 0-based steps 0-1 warm up, 2 and 4
# mask (deltaT 2), 5 = total_step - tfinal fixes the final mask, 6-7 keep it.
CONFIG = dict(
    task_type="CAUSAL_LM",
    init_r=4,
    target_r=2,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "up_proj"],
    total_step=8,
    tinit=1,
    tfinal=3,
    deltaT=2,
)
FINAL_STEP = CONFIG["total_step"] - CONFIG["tfinal"]
ADALORA = jpeft.registered()["adalora"]


@pytest.fixture(scope="module")
def base_of(tmp_path_factory):
    """family -> (checkpoint dir, jpeft model, params, input ids), built once per family."""
    cache = {}

    def build(family: str):
        if family not in cache:
            cache[family] = build_base(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return build


def peft_adalora(path, **changes) -> peft.PeftModel:
    return peft.get_peft_model(load_hf(path), peft.AdaLoraConfig(**{**CONFIG, **changes}))


def peft_pieces(model: peft.PeftModel) -> dict[str, dict[str, np.ndarray]]:
    """{module: {lora_A/E/B: array}} of the PEFT model's (only) adapter."""
    pieces: dict[str, dict[str, np.ndarray]] = {}
    for name, p in model.base_model.model.named_parameters():
        if ".lora_" in name:
            module, piece, _ = name.rsplit(".", 2)
            pieces.setdefault(module, {})[piece] = p.detach().numpy().copy()
    return pieces


def peft_rank_pattern(model: peft.PeftModel) -> dict | None:
    """PEFT's in-memory rank_pattern with the adapter name stripped, as it saves it."""
    pattern = model.peft_config["default"].rank_pattern
    return None if pattern is None else {k.replace(".default", ""): v for k, v in pattern.items()}


def jpeft_rank_pattern(adapter: jpeft.Adapter, state) -> dict | None:
    pattern = ADALORA.finish_training(adapter, state).config.rank_pattern
    return None if pattern is None else {k: list(v) for k, v in pattern.items()}


def perturb_jax(adapter: jpeft.Adapter) -> jpeft.Adapter:
    trainable, frozen = jpeft.partition(adapter)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jpeft.combine(jax.tree.unflatten(treedef, leaves), frozen)


def apply(base, adapter=None, params=None) -> np.ndarray:
    _, model, base_params, ids = base
    params = base_params if params is None else params
    return np.asarray(model.apply(params, jnp.asarray(ids), adapter=adapter))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_adapter_loads_in_jpeft(base_of, family, tmp_path):
    base = base_of(family)
    model = peft_adalora(base[0])
    perturb_torch(model)  # E non-zero
    expected = torch_logits(model.eval(), base[3])
    model.save_pretrained(tmp_path)

    adapter = jpeft.load_pretrained(tmp_path)
    np.testing.assert_allclose(apply(base, adapter), expected, atol=TOL, rtol=0)
    merged = jpeft.merge(base[2], adapter)
    np.testing.assert_allclose(apply(base, params=merged), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_jpeft_adapter_loads_in_peft(base_of, family, tmp_path):
    base = base_of(family)
    path, _, params, ids = base
    config = jpeft.AdaLoraConfig(**CONFIG)
    adapter = perturb_jax(jpeft.init_adapter(params, config, key=jax.random.key(0)))
    jpeft.save_pretrained(adapter, tmp_path / "jpeft")
    loaded = peft.PeftModel.from_pretrained(load_hf(path), tmp_path / "jpeft").eval()
    np.testing.assert_allclose(torch_logits(loaded, ids), apply(base, adapter), atol=TOL, rtol=0)

    peft_adalora(path).save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "jpeft" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    ours = json.loads((tmp_path / "jpeft" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    assert set(ours.pop("target_modules")) == set(theirs.pop("target_modules"))
    ours.pop("base_model_name_or_path"), theirs.pop("base_model_name_or_path")
    assert ours == theirs


def test_orthogonality_loss_is_peft_forward_loss_minus_plain_loss(base_of, tmp_path):
    path, _, _, ids = base_of("llama")
    model = peft_adalora(path, orth_reg_weight=0.3)
    perturb_torch(model)
    tokens = torch.tensor(ids)
    with torch.no_grad():
        with_reg = model(input_ids=tokens, labels=tokens).loss
        plain = model.base_model.model(input_ids=tokens, labels=tokens).loss
    model.save_pretrained(tmp_path)
    ours = ADALORA.regularizer(jpeft.load_pretrained(tmp_path))
    np.testing.assert_allclose(float(ours), float(with_reg - plain), atol=2e-6, rtol=0)


def test_budget_schedule_is_peft_s(base_of):
    changes = dict(total_step=1000, tinit=37, tfinal=101, deltaT=7)
    allocator = peft_adalora(base_of("llama")[0], **changes).base_model.rankallocator
    config = jpeft.AdaLoraConfig(**{**CONFIG, **changes})
    final = config.total_step - config.tfinal
    for step in range(final):
        expected = allocator.budget_schedule(step)
        assert budget_schedule(config, step, 36, 18) == expected, step
    assert budget_schedule(config, final, 36, 18) == (18, True)  # PEFT forces the final mask
    assert budget_schedule(config, final + 1, 36, 18) == (18, False)  # and then re-applies it


def allocator_start(model: peft.PeftModel, step: int, grads: dict, rng) -> tuple:
    """Set PEFT's importance EMAs to random values and its gradients to `grads`; jpeft's
    (optimizer, trainable adapter, state at `step`) with the same EMAs."""
    allocator = model.base_model.rankallocator
    ema: dict[str, dict[str, jax.Array]] = {}
    unc: dict[str, dict[str, jax.Array]] = {}
    for name, p in model.base_model.model.named_parameters():
        if ".lora_" in name:
            module, piece, _ = name.rsplit(".", 2)
            values = [rng.uniform(size=p.shape).astype(np.float32) for _ in range(2)]
            allocator.ipt[name] = torch.zeros_like(p)
            allocator.exp_avg_ipt[name], allocator.exp_avg_unc[name] = map(torch.tensor, values)
            ema.setdefault(module, {})[piece] = jnp.asarray(values[0])
            unc.setdefault(module, {})[piece] = jnp.asarray(values[1])
            p.grad = torch.tensor(grads[module][piece])
    return ema, unc


def jpeft_from_peft(model: peft.PeftModel, directory) -> tuple[jpeft.Adapter, jpeft.Adapter]:
    model.save_pretrained(directory)
    return jpeft.partition(jpeft.load_pretrained(directory))


@pytest.mark.parametrize("step", [2, FINAL_STEP])
def test_same_importance_keeps_the_same_triplets(base_of, step, tmp_path):
    """At a budgeting step (importance updated first, budget 25) and the final step (budget 18,
    importance as given), from the same EMAs, gradients and weights."""
    model = peft_adalora(base_of("llama")[0])
    perturb_torch(model)
    trainable, _ = jpeft_from_peft(model, tmp_path)
    rng = np.random.default_rng(step)
    grads = {
        m: {p: rng.normal(size=v.shape).astype(np.float32) for p, v in pieces.items()}
        for m, pieces in peft_pieces(model).items()
    }
    ema, unc = allocator_start(model, step, grads, rng)
    model.base_model.update_and_allocate(step)

    optimizer = ADALORA.wrap_optimizer(trainable.config, optax.sgd(0.0))
    state = optimizer.init(trainable)
    state = state._replace(
        count=jnp.int32(step),
        ipt=state.ipt.replace(weights=ema),
        unc=state.unc.replace(weights=unc),
    )
    grad_tree = trainable.replace(weights=jax.tree.map(jnp.asarray, grads))
    updates, state = jax.jit(optimizer.update)(grad_tree, state, trainable)
    new = optax.apply_updates(trainable, updates)

    theirs = peft_pieces(model)
    for module, pieces in new.weights.items():
        np.testing.assert_array_equal(pieces["lora_E"] == 0, theirs[module]["lora_E"] == 0)
    pattern = peft_rank_pattern(model)
    assert jpeft_rank_pattern(new, state) == pattern
    kept = sum(map(sum, pattern.values()))
    assert kept == (25 if step == 2 else 18)
    if step == FINAL_STEP:  # no importance update here: `allocate` on the given EMAs directly
        scores = {m: triplet_scores(ema[m], unc[m]) for m in ema}
        direct = {f"{m}.lora_E": list(map(bool, keep)) for m, keep in allocate(scores, 18).items()}
        assert direct == pattern


# PEFT's own warnings about its pruned file: a rank-0 module looks like an unsharded ZeRO-3 save to
# it, and its generic loader reads rank_pattern as LoRA's {module regex: rank}.
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
def test_update_and_allocate_steps_then_pruned_file(base_of, tmp_path):
    """PEFT's SGD + update_and_allocate(step) for every step of the run vs jpeft's wrapped
    optax.sgd with the same hand-set gradients (one module's tiny, so it is pruned to rank 0);
    then PEFT's pruned file loads in jpeft, jpeft writes it back unchanged, and jpeft's own
    adapter saves the same file."""
    base = base_of("llama")
    model = peft_adalora(base[0])
    trainable, frozen = jpeft_from_peft(model, tmp_path / "start")
    lora = [p for name, p in model.named_parameters() if ".lora_" in name]
    torch_sgd = torch.optim.SGD(lora, lr=0.1)
    optimizer = ADALORA.wrap_optimizer(trainable.config, optax.sgd(0.1))
    state = optimizer.init(trainable)
    update = jax.jit(optimizer.update)
    rng = np.random.default_rng(0)
    quiet = "model.layers.1.self_attn.v_proj"
    for step in range(CONFIG["total_step"]):
        grads = {}
        for name, p in model.base_model.model.named_parameters():
            if ".lora_" in name:
                module, piece, _ = name.rsplit(".", 2)
                g = rng.normal(size=p.shape).astype(np.float32) * (1e-3 if module == quiet else 1)
                grads.setdefault(module, {})[piece] = g
                p.grad = torch.tensor(g)
        torch_sgd.step()
        model.base_model.update_and_allocate(step)
        updates, state = update(trainable.replace(weights=grads), state, trainable)
        trainable = optax.apply_updates(trainable, updates)

        theirs = peft_pieces(model)
        for module, pieces in trainable.weights.items():
            for piece, value in pieces.items():
                np.testing.assert_allclose(value, theirs[module][piece], atol=1e-6, rtol=0)
            np.testing.assert_array_equal(pieces["lora_E"] == 0, theirs[module]["lora_E"] == 0)
        assert jpeft_rank_pattern(trainable, state) == peft_rank_pattern(model), step
    assert not any(peft_rank_pattern(model)[f"{quiet}.lora_E"])

    expected = torch_logits(model.eval(), base[3])
    model.save_pretrained(tmp_path / "peft")
    loaded = jpeft.load_pretrained(tmp_path / "peft")
    assert loaded.weights[quiet]["lora_A"].shape == (0, 32)
    np.testing.assert_allclose(apply(base, loaded), expected, atol=TOL, rtol=0)
    reloaded = peft.PeftModel.from_pretrained(load_hf(base[0]), tmp_path / "peft").eval()
    np.testing.assert_allclose(torch_logits(reloaded, base[3]), expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(apply(base, params=jpeft.merge(base[2], loaded)), expected, atol=TOL)

    jpeft.save_pretrained(loaded, tmp_path / "again")
    trained = ADALORA.finish_training(jpeft.combine(trainable, frozen), state)
    jpeft.save_pretrained(trained, tmp_path / "trained")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for directory, atol in (("again", 0), ("trained", 1e-6)):
        ours = load_file(tmp_path / directory / "adapter_model.safetensors")
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
        for key, value in theirs.items():
            np.testing.assert_allclose(ours[key], value, atol=atol, rtol=0, err_msg=key)
        ours_json = json.loads((tmp_path / directory / "adapter_config.json").read_text())
        assert ours_json["rank_pattern"] == peft_json["rank_pattern"]
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == peft_json


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(total_step=None), "total_step=None"),
        (dict(total_step=10, tinit=4, tfinal=6), "tinit=4 and tfinal=6 leave no budgeting"),
        (dict(use_dora=True), "does not support DoRA"),
    ],
)
def test_configs_peft_refuses_are_refused(changes, match):
    kwargs = {**CONFIG, **changes}
    with pytest.raises(ValueError):
        peft.AdaLoraConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        jpeft.AdaLoraConfig(**kwargs)
