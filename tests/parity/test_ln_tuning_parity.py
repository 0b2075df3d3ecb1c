"""LN tuning against PyTorch PEFT, both directions, on tiny random Llama, Qwen2 and Qwen3 models.

For each family and config: PEFT's adapter with every copy perturbed, saved by PEFT, gives PEFT's
logits in jpeft, merged or not; jpeft's perturbed adapter, saved by jpeft, gives jpeft's logits
in `PeftModel.from_pretrained`; the saved keys, shapes and adapter_config.json equal PEFT's, and
a fresh adapter's copies equal PEFT's fresh copies (the base parameters). The targets cover
PEFT's per-architecture defaults, the final norm, Qwen3's q_norm/k_norm and linear layers with
a bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from hf_bases import load_hf, torch_logits
from safetensors.numpy import load_file
from two_way import (
    TOL,
    WEIGHTS,
    check_jpeft_adapter_loads,
    check_peft_adapter_loads,
    perturb_jax,
)

import jpeft
from jpeft.injection import untouched_layers
from jpeft.method import JobSpec, method_for
from jpeft.quant import quantize_params

CONFIGS = {
    "defaults": {},
    "linear_and_final_norm": dict(target_modules=["q_proj", "down_proj", "norm"]),
    "regex_save": dict(
        target_modules=r"model\.layers\.[02]\.\w+layernorm",
        exclude_modules=["model.layers.2.input_layernorm"],
        modules_to_save=["lm_head"],
    ),
}
CASES = [(family, name) for family in ("llama", "qwen2") for name in CONFIGS]
CONFIGS["qk_norm"] = dict(target_modules=["q_norm", "k_norm", "input_layernorm"])
CASES += [("qwen3", "qk_norm")]
TIED = dict(target_modules=["embed_tokens", "lm_head"])
KEY = jax.random.key(0)
# PEFT warns that it copies a module type it does not know (its RMSNorm classes), and that it
# saves the base tables of targeted embeddings.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Unsupported layer type"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`"),
]


@pytest.mark.parametrize("family, name", [*CASES, ("qwen3", "tied")])
def test_peft_adapter_loads_in_jpeft(base_of, family, name, tmp_path):
    base = base_of(family)
    config = peft.LNTuningConfig(**CONFIGS.get(name, TIED), **base.common())
    check_peft_adapter_loads(base, config, tmp_path)


@pytest.mark.parametrize("family, name", CASES)
def test_jpeft_adapter_loads_in_peft(base_of, family, name, tmp_path):
    base = base_of(family)
    kwargs = dict(**CONFIGS[name], **base.common())
    config = jpeft.LNTuningConfig(**kwargs)
    check_jpeft_adapter_loads(base, config, peft.LNTuningConfig(**kwargs), tmp_path)
    fresh = jpeft.init_adapter(base.params, config, key=KEY, model=base.model)
    ours = method_for(config).to_file(fresh)[1]
    theirs = load_file(tmp_path / "peft" / WEIGHTS)
    for key, value in theirs.items():
        np.testing.assert_array_equal(np.asarray(ours[key]), value, err_msg=key)


def test_tied_embedding_and_head_load_in_peft(base_of, tmp_path):
    """Copies of a tied table and head: the head's copy unties it, in PEFT as in jpeft. PEFT also
    saves the base tables of targeted embeddings (`save_embedding_layers="auto"`); jpeft leaves
    them out, as for LoRA, and PEFT loads the file without them."""
    base = base_of("qwen3")
    config = jpeft.LNTuningConfig(**TIED, **base.common())
    adapter = perturb_jax(jpeft.init_adapter(base.params, config, key=KEY))
    jpeft.save_pretrained(adapter, tmp_path / "jpeft")
    expected = base.logits(base.params, adapter)
    base.assert_changed(expected)
    loaded = peft.PeftModel.from_pretrained(load_hf(base.path), tmp_path / "jpeft").eval()
    np.testing.assert_allclose(torch_logits(loaded, base.ids), expected, atol=TOL, rtol=0)
    peft_model = peft.get_peft_model(load_hf(base.path), peft.LNTuningConfig(**TIED))
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / WEIGHTS)
    assert set(load_file(tmp_path / "jpeft" / WEIGHTS)) == {
        key for key in theirs if not key.endswith(".base_layer.weight")
    }


def test_copies_keep_the_base_dtype(base_of):
    """PEFT skips the adapter autocast for LN tuning: the copies (and file) are in base dtype."""
    base = base_of("qwen2")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base.params)
    config = jpeft.LNTuningConfig(target_modules=["q_proj", "norm"])
    adapter = jpeft.init_adapter(params, config, key=KEY)
    tensors = method_for(config).to_file(adapter)[1]
    assert "base_model.model.model.layers.1.self_attn.q_proj.ln_tuning_layers.bias" in tensors
    assert {np.dtype(v.dtype) for v in tensors.values()} == {np.dtype(jnp.bfloat16)}


def test_untouched_layers_and_merge(base_of):
    """Layers below the lowest copy run without backward (the final norm is output side);
    merge puts the copies in, and cannot be undone from the merged params."""
    base = base_of("llama")
    targets = r"model\.layers\.[12]\.input_layernorm|model\.norm"
    config = jpeft.LNTuningConfig(target_modules=targets)
    adapter = jpeft.init_adapter(base.params, config, key=KEY)
    assert sorted(adapter.overrides) == [
        "model.layers.1.input_layernorm.weight",
        "model.layers.2.input_layernorm.weight",
        "model.norm.weight",
    ]
    assert untouched_layers(base.params, adapter) == 1
    only_final = jpeft.init_adapter(base.params, config.replace(target_modules=["norm"]), key=KEY)
    assert untouched_layers(base.params, only_final) == 3
    moved = adapter.replace(overrides={k: v + 1 for k, v in adapter.overrides.items()})
    merged = jpeft.merge(base.params, moved)
    np.testing.assert_array_equal(
        merged["model"]["norm"]["weight"], moved.overrides["model.norm.weight"]
    )
    with pytest.raises(ValueError, match="cannot unmerge a LN_TUNING adapter"):
        jpeft.unmerge(merged, moved)


def test_job_trains_the_top_layers_and_the_final_norm(base_of):
    base = base_of("llama")
    job = JobSpec("llama", 3, [2], 4, 8.0, 0.0, None, 3, "", "", 10, dict(task_type="CAUSAL_LM"))
    config = jpeft.registered()["ln-tuning"].job_config(job)
    adapter = jpeft.init_adapter(base.params, config, key=KEY, model=base.model)
    assert sorted(adapter.overrides) == [
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.post_attention_layernorm.weight",
        "model.norm.weight",
    ]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(target_modules=["self_attn"]), r"matches 'model\.layers\.0\.self_attn', a module "),
        (dict(target_modules=r"model\.layers\.1"), r"'model\.layers\.1', a module that contains"),
        (dict(target_modules=["rotary_emb"]), r"\['rotary_emb'\] matched no module.*q_norm"),
        (dict(target_modules=["q_proj"]), r"q_proj\.weight is a 4-bit quantized weight"),
        (dict(), r"no LN tuning default for model type None"),
    ],
)
def test_refusals_name_the_module(base_of, fields, message):
    base = base_of("qwen3")
    params = quantize_params(base.params) if "q_proj" in str(fields) else base.params
    with pytest.raises(ValueError, match=message):
        jpeft.init_adapter(params, jpeft.LNTuningConfig(**fields), key=KEY)
