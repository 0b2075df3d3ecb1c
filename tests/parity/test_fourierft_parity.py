"""FourierFT against PyTorch PEFT, both directions, on tiny random Llama and Qwen2 models.

For each family and config: a PEFT adapter with its spectra perturbed (and a modules_to_save
copy) loaded by jpeft gives PEFT's logits, merged or not; jpeft's own adapter, perturbed, saved by
jpeft and loaded by `PeftModel.from_pretrained` gives jpeft's logits; the saved keys, shapes and
adapter_config.json equal those PEFT writes. The frequency positions PEFT never saves come from
torch's CPU randperm, which jpeft reproduces: checked against torch for the shapes of SmolLM2-135M
and others, several seeds.
"""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
import torch
from two_way import check_jpeft_adapter_loads, check_peft_adapter_loads

import jpeft
from jpeft.methods.fourierft import SPECTRUM, check_layer, frequency_positions
from jpeft.methods.torch_random import RANDPERM_32BIT_LIMIT
from jpeft.methods.torch_random import randperm_prefix as torch_randperm_prefix
from jpeft.quant import quantize_params

FAMILIES = ("llama", "qwen2")
# Tiny bases: q/o 32x32, k/v 16x32, gate/up 48x32, down 32x48 (so n_frequency <= 512 for k/v).
CONFIGS = {
    "defaults": dict(n_frequency=200, scaling=20.0),
    "explicit": dict(
        n_frequency=64,
        scaling=300.0,
        random_loc_seed=3,
        target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
        exclude_modules=["model.layers.1.mlp.up_proj"],
        init_weights=True,
        modules_to_save=["lm_head"],
        bias="all",
    ),
    # per-layer n_frequency (a stack zero-padded to the largest); the escaped full name matches
    # neither PEFT's `.*\.{key}$` nor the name itself, so PEFT (and jpeft) keep n_frequency there
    "patterns": dict(
        n_frequency=100,
        scaling=50.0,
        target_modules=r".*\.(q|down)_proj",
        n_frequency_pattern={
            "down_proj": 400,
            "model.layers.1.self_attn.q_proj": 30,
            r"model\.layers\.2\.self_attn\.q_proj": 7,
        },
    ),
    "layers_seed_bias": dict(
        n_frequency=50,
        random_loc_seed=-5,
        target_modules=["v_proj", "gate_proj"],
        layers_to_transform=[0, 2],
        bias="fourier_only",
    ),
}
CASES = [(family, name) for family in FAMILIES for name in CONFIGS]

# SmolLM2-135M's weights (hidden 576, intermediate 1536, kv dim 192) and odd small ones.
SIZES = [576 * 576, 192 * 576, 1536 * 576, 576 * 1536, 1, 2, 3, 97, 1000, 65536]


@pytest.mark.parametrize("family, name", CASES)
def test_peft_adapter_loads_in_jpeft(base_of, family, name, tmp_path):
    base = base_of(family)
    config = peft.FourierFTConfig(**CONFIGS[name], **base.common())
    check_peft_adapter_loads(base, config, tmp_path)


@pytest.mark.parametrize("family, name", CASES)
def test_jpeft_adapter_loads_in_peft(base_of, family, name, tmp_path):
    base = base_of(family)
    kwargs = dict(**CONFIGS[name], **base.common())
    config = jpeft.FourierFTConfig(**kwargs)
    check_jpeft_adapter_loads(base, config, peft.FourierFTConfig(**kwargs), tmp_path)


@pytest.mark.parametrize("init_weights", [False, True])
def test_init_matches_peft(base_of, init_weights):
    """PEFT's init: zeros with init_weights=True (the logits stay), else standard normal."""
    base = base_of("llama")
    config = jpeft.FourierFTConfig(n_frequency=400, init_weights=init_weights)
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(0), model=base.model)
    spectra = np.concatenate(
        [np.asarray(p["fourierft_spectrum"]) for p in adapter.weights.values()]
    )
    logits = base.logits(base.params, adapter)
    if init_weights:
        assert not spectra.any()
        np.testing.assert_array_equal(logits, base.base_logits)
    else:
        assert abs(spectra.mean()) < 0.1 and abs(spectra.std() - 1) < 0.1
        base.assert_changed(logits)


@pytest.mark.parametrize("seed", [777, 0, 12345, -5, 2**32 + 7, 2**64 - 1])
def test_positions_are_torch_randperm(seed):
    """torch's CPU randperm prefix, bit for bit, for the main job's shapes and small ones."""
    for size in SIZES:
        generator = torch.Generator().manual_seed(seed)
        expected = torch.randperm(size, generator=generator).numpy()
        for count in {1, min(1000, size), size} if size < 5000 else {1000, 5000}:
            np.testing.assert_array_equal(
                torch_randperm_prefix(size, seed, count), expected[:count], err_msg=f"{size}"
            )
    rows, cols = frequency_positions(192, 576, seed, 1000)
    perm = torch.randperm(192 * 576, generator=torch.Generator().manual_seed(seed))[:1000]
    np.testing.assert_array_equal(rows, (perm // 576).numpy())
    np.testing.assert_array_equal(cols, (perm % 576).numpy())


def test_merge_equals_unmerged_delta(base_of):
    """merged weight - base == PEFT's dW for the same spectrum (the ifft2 formula in torch)."""
    base = base_of("llama")
    config = jpeft.FourierFTConfig(n_frequency=300, scaling=40.0, target_modules=["v_proj"])
    adapter = jpeft.init_adapter(base.params, config, key=jax.random.key(1), model=base.model)
    merged = jpeft.merge(base.params, adapter)
    module = "model.layers.1.self_attn.v_proj"
    spectrum = torch.tensor(np.asarray(adapter.weights[module][SPECTRUM]))
    indices = torch.randperm(16 * 32, generator=torch.Generator().manual_seed(777))[:300]
    dense = torch.zeros(16, 32)
    dense[indices // 32, indices % 32] = spectrum
    expected = (torch.fft.ifft2(dense).real * 40.0).numpy()
    layers = merged["model"]["layers"]["self_attn"]["v_proj"]["weight"]
    before = base.params["model"]["layers"]["self_attn"]["v_proj"]["weight"]
    np.testing.assert_allclose(np.asarray(layers[1] - before[1]), expected, atol=1e-5)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_frequency=0), r"n_frequency must be a positive integer, got 0"),
        (dict(n_frequency_pattern={"q_proj": -1}), r"n_frequency_pattern\['q_proj'\] must be > 0"),
        (dict(n_frequency_pattern={"(": 3}), r"n_frequency_pattern\['\('\] is not a valid regul"),
        (dict(random_loc_seed=None), r"random_loc_seed must be an integer .* got None"),
        (dict(random_loc_seed=2**64), r"random_loc_seed must be an integer"),
        (dict(bias="lora_only"), r"bias must be 'none', 'all' or 'fourier_only'"),
        (dict(target_modules="q", layers_to_transform=[0]), r"layers_to_transform.*cannot"),
    ],
)
def test_bad_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        jpeft.FourierFTConfig(**fields)


def test_layers_that_do_not_fit_are_refused(base_of):
    """n_frequency beyond a weight's entries (PEFT refuses too), in init and in a loaded file;
    weights too large for torch's 32-bit randperm; 4-bit bases."""
    base = base_of("llama")
    config = jpeft.FourierFTConfig(n_frequency=600)  # v_proj: 16 x 32 = 512 entries
    pattern = r"model\.layers\.0\.self_attn\.v_proj: n_frequency=600 exceeds the 512 entries"
    with pytest.raises(ValueError, match=pattern):
        jpeft.init_adapter(base.params, config, key=jax.random.key(0), model=base.model)
    fitting = config.replace(target_modules=["q_proj"])
    adapter = jpeft.init_adapter(base.params, fitting, key=jax.random.key(0))
    moved = jpeft.Adapter(
        fitting.replace(target_modules=["v_proj"]),
        {k.replace("q_proj", "v_proj"): v for k, v in adapter.weights.items()},
        {},
    )
    with pytest.raises(ValueError, match=pattern):
        base.logits(base.params, moved)
    side = int(np.ceil(np.sqrt(RANDPERM_32BIT_LIMIT)))
    with pytest.raises(ValueError, match=r"big: .* entries, for which torch's randperm"):
        check_layer(jpeft.FourierFTConfig(), "big", (side, side))
    with pytest.raises(ValueError, match=r"q_proj: it is a 4-bit quantized weight"):
        jpeft.init_adapter(quantize_params(base.params), fitting, key=jax.random.key(0))
