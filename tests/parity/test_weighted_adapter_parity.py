"""`jpeft.add_weighted_adapter` against PEFT's `add_weighted_adapter`, on a tiny Llama.

Two perturbed LoRA adapters of different targets (and alphas) live in one PEFT model; PEFT
combines them, saves the result, and jpeft combines the same two adapters loaded from PEFT's
files. The deterministic types give PEFT's tensors (SVD types: PEFT's B A per module, the singular
vectors' signs being free) and PEFT's logits; the random DARE types are checked by their
properties; IA3's weighted sum likewise against PEFT's. PEFT's rsLoRA bug (the new adapter keeps
`use_rslora`, scaling the result by sqrt(r)) is shown next to jpeft's correct result.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hf_bases import build_base, load_hf, torch_logits
from safetensors.numpy import load_file

import jpeft
from jpeft import task_arithmetic as ta

TOL = 1e-5
WEIGHTS = "adapter_model.safetensors"
SOURCES = {  # names PEFT accepts: not inside its "lora_" / "ia3_" prefixes
    "one": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "two": dict(r=4, lora_alpha=16, target_modules=["v_proj", "up_proj"]),
}
MIX = [0.7, -0.4]
DETERMINISTIC = [
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    """{combination type: (PEFT's saved dir, PEFT's logits)}, the sources' dirs, the base."""
    root = tmp_path_factory.mktemp("weighted")
    path, model, params, ids = build_base("llama", root / "base")
    peft_model = _peft_with_sources(path, peft.LoraConfig, SOURCES)
    results = {}
    for kind in DETERMINISTIC:
        peft_model.add_weighted_adapter(
            ["one", "two"],
            MIX,
            kind,
            combination_type=kind,
            density=0.5,
            majority_sign_method="total",
        )
        peft_model.set_adapter(kind)
        results[kind] = torch_logits(peft_model, ids)
    peft_model.save_pretrained(root / "peft")
    return root / "peft", results, (model, params, ids)


def _peft_with_sources(path, config_class, sources: dict):
    """A PEFT model holding the adapters `sources`, every adapter tensor perturbed."""
    names = list(sources)
    peft_model = peft.get_peft_model(
        load_hf(path), config_class(**sources[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        peft_model.add_adapter(name, config_class(**sources[name]))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if any(f".{name}" in key for name in names):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return peft_model.eval()


def sources(directory) -> list[jpeft.Adapter]:
    return [jpeft.load_pretrained(directory / name) for name in SOURCES]


def deltas(tensors: dict, scaling: float) -> dict[str, np.ndarray]:
    """{module: scaling * B @ A} of a saved LoRA adapter's tensors."""
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = scaling * np.asarray(tensors[f"{module}.lora_B.weight"]) @ np.asarray(a)
    return out


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_deterministic_types_match_peft(combined, kind, tmp_path):
    directory, peft_logits, (model, params, ids) = combined
    ours = jpeft.add_weighted_adapter(
        sources(directory), MIX, combination_type=kind, density=0.5, majority_sign_method="total"
    )
    jpeft.save_pretrained(ours, tmp_path)
    got, theirs = load_file(tmp_path / WEIGHTS), load_file(directory / kind / WEIGHTS)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in theirs.items()}
    if kind.endswith("svd"):  # singular vectors up to sign: compare B A
        ours_d, theirs_d = deltas(got, 1.0), deltas(theirs, 1.0)
        for module, value in theirs_d.items():
            np.testing.assert_allclose(ours_d[module], value, atol=TOL, rtol=0, err_msg=module)
    else:
        for key, value in theirs.items():
            np.testing.assert_allclose(got[key], value, atol=TOL, rtol=0, err_msg=key)
    logits = np.asarray(model.apply(params, jnp.asarray(ids), adapter=ours))
    np.testing.assert_allclose(logits, peft_logits[kind], atol=TOL, rtol=0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = json.loads((directory / kind / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert config[field] == expected[field], field
    assert sorted(config["target_modules"]) == sorted(expected["target_modules"])


def test_cat_is_the_exact_weighted_sum(combined):
    """cat's B A is sum_i w_i s_i B_i A_i, module by module (s_a = 2, s_b = 4)."""
    directory, _, _ = combined
    a, b = sources(directory)
    cat = jpeft.add_weighted_adapter([a, b], MIX, combination_type="cat")
    tensors = {f"{m}.{k}": v for m, p in cat.weights.items() for k, v in p.items()}
    got = deltas(tensors, 1.0)
    for module in got:
        want = sum(
            w * deltas({f"{module}.{k}": v for k, v in src.weights[module].items()}, s)[module]
            for w, src, s in ((MIX[0], a, 2.0), (MIX[1], b, 4.0))
            if module in src.weights
        )
        np.testing.assert_allclose(got[module], want, atol=TOL, rtol=0, err_msg=module)


def test_rslora_sources_peft_scales_by_sqrt_r(tmp_path):
    """PEFT keeps use_rslora=True on the new adapter, so its `cat` result is sqrt(r) times the
    weighted sum; jpeft writes use_rslora=False and gives the sum."""
    path, model, params, ids = build_base("llama", tmp_path / "base")
    rs = {name: dict(cfg, use_rslora=True) for name, cfg in SOURCES.items()}
    peft_model = _peft_with_sources(path, peft.LoraConfig, rs)
    peft_model.add_weighted_adapter(["one", "two"], MIX, "c", combination_type="cat")
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "c" / "adapter_config.json").read_text())
    assert theirs["use_rslora"] is True and theirs["r"] == 8
    one, two = sources(tmp_path / "peft")
    ours = jpeft.add_weighted_adapter([one, two], MIX, combination_type="cat")
    assert ours.config.use_rslora is False and ours.config.scaling_for("any") == 1.0
    module = "model.layers.0.self_attn.v_proj"  # in both sources
    layer = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    with torch.no_grad():
        theirs_delta = layer.get_delta_weight("c").numpy()
    ours_delta = deltas({f"{module}.{k}": v for k, v in ours.weights[module].items()}, 1.0)
    truth = sum(
        w * deltas({f"{module}.{k}": v for k, v in src.weights[module].items()}, s)[module]
        for w, src, s in ((MIX[0], one, 8 / 2), (MIX[1], two, 16 / 2))  # alpha / sqrt(4)
    )
    np.testing.assert_allclose(ours_delta[module], truth, atol=TOL, rtol=0)
    np.testing.assert_allclose(theirs_delta, np.sqrt(8) * truth, atol=1e-4, rtol=1e-5)


def test_ia3_weighted_sum_matches_peft(tmp_path):
    path, model, params, ids = build_base("llama", tmp_path / "base")
    ia3 = {
        "one": dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "two": dict(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    peft_model = _peft_with_sources(path, peft.IA3Config, ia3)
    peft_model.add_weighted_adapter(["one", "two"], MIX, "c")
    peft_model.set_adapter("c")
    expected = torch_logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = jpeft.add_weighted_adapter(
        [jpeft.load_pretrained(tmp_path / "peft" / n) for n in ia3], MIX, combination_type="linear"
    )
    theirs = load_file(tmp_path / "peft" / "c" / WEIGHTS)
    jpeft.save_pretrained(ours, tmp_path / "ours")
    for key, value in load_file(tmp_path / "ours" / WEIGHTS).items():
        np.testing.assert_allclose(value, theirs[key], atol=TOL, rtol=0, err_msg=key)
    logits = np.asarray(model.apply(params, jnp.asarray(ids), adapter=ours))
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)


def test_dare_keeps_a_density_share_rescaled_and_is_seeded():
    rng = np.random.default_rng(0)
    tensors = [jnp.asarray(rng.standard_normal((64, 64), np.float32)) for _ in range(2)]
    key = jax.random.key(3)
    pruned = ta.prune_random(tensors[0], 0.3, key)
    kept = np.asarray(pruned) != 0
    assert 0.25 < kept.mean() < 0.35
    kept_values = np.asarray(tensors[0])[kept]
    np.testing.assert_allclose(np.asarray(pruned)[kept], kept_values / 0.3, rtol=1e-6)  # float32
    first = ta.dare_linear(tensors, MIX, 0.3, key)
    np.testing.assert_array_equal(first, ta.dare_linear(tensors, MIX, 0.3, key))
    assert not np.array_equal(first, ta.dare_linear(tensors, MIX, 0.3, jax.random.key(4)))
    # dare_ties: entries whose kept values disagree in sign with the elected one do not count
    mixed = ta.dare_ties(tensors, [1.0, 1.0], 0.999999, key)
    t0, t1 = (np.asarray(t) for t in tensors)
    agree = np.sign(t0) == np.sign(t1)
    np.testing.assert_allclose(
        np.asarray(mixed)[agree], ((t0 + t1) / 2 / 0.999999)[agree], rtol=1e-5
    )


def test_dare_types_combine_and_need_a_key(combined):
    directory, _, (model, params, ids) = combined
    srcs = sources(directory)
    with pytest.raises(ValueError, match="pass key="):
        jpeft.add_weighted_adapter(srcs, MIX, combination_type="dare_linear", density=0.5)
    for kind in ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"):
        one = jpeft.add_weighted_adapter(
            srcs, MIX, combination_type=kind, density=0.5, key=jax.random.key(0)
        )
        again = jpeft.add_weighted_adapter(
            srcs, MIX, combination_type=kind, density=0.5, key=jax.random.key(0)
        )
        assert jax.tree.all(jax.tree.map(np.array_equal, one.weights, again.weights)), kind
        assert np.isfinite(np.asarray(model.apply(params, jnp.asarray(ids), adapter=one))).all()


@pytest.mark.parametrize(
    "change, kwargs, match",
    [
        (dict(two=dict(r=2)), dict(combination_type="linear"), "same r value.*\\[4, 2\\]"),
        (dict(), dict(combination_type="tie"), "Invalid combination_type: 'tie'"),
        (dict(), dict(combination_type="ties"), "density is None"),
        (dict(), dict(combination_type="ties", density=-0.1), "Density should be >= 0"),
        (dict(two=dict(use_dora=True)), dict(), "adapter 1 uses DoRA"),
        (dict(two=dict(target_modules=".*up_proj")), dict(), "mix of list/set and string"),
        (dict(two=dict(layers_to_transform=[0])), dict(), "differ in layers_to_transform"),
        (dict(two=dict(modules_to_save=["lm_head"])), dict(), "adapter 1 trains"),
        (dict(), dict(svd_rank=99), "svd_rank 99 is above"),
    ],
)
def test_refusals(tmp_path, change, kwargs, match):
    path, model, params, _ = build_base("llama", tmp_path)
    adapters = []
    for name, fields in SOURCES.items():
        config = jpeft.LoraConfig(**{**fields, **change.get(name, {})})
        adapters.append(jpeft.init_adapter(params, config, key=jax.random.key(0), model=model))
    with pytest.raises(ValueError, match=match):
        jpeft.add_weighted_adapter(adapters, MIX, **kwargs)


def test_weights_must_match_the_adapters(combined):
    directory, _, _ = combined
    with pytest.raises(ValueError, match="one weight per adapter, got 2 adapters and 1 weights"):
        jpeft.add_weighted_adapter(sources(directory), [1.0])
