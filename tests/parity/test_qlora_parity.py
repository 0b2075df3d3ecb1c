"""QLoRA against transformers + bitsandbytes + PEFT on CPU, both directions.

- Quantizing while loading (`from_pretrained(path, quantize=...)`) gives, layer by layer, the
  bytes transformers' bitsandbytes load gives, and the same logits.
- A checkpoint transformers saved with a bitsandbytes 4-bit `quantization_config` loads as it is
  and gives the PyTorch model's logits.
- LoRA, DoRA and IA3 adapters trained on the 4-bit model in PyTorch give PEFT's logits in jpeft
  on the 4-bit base, and jpeft's adapters on the 4-bit base give jpeft's logits in PEFT.
- Merging into a 4-bit base gives float weights with the unmerged logits; re-quantizing them
  gives bitsandbytes' bytes for the same merged weights (what PEFT's merge writes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from bnb_bases import (
    BNB_CONFIGS,
    QLORA_SIZES,
    load_quantized_hf,
    quantized_hf,
    save_quantized,
)
from hf_bases import build_base, perturb_torch, torch_logits
from test_lora_parity import perturb_jax

import jpeft
from jpeft.quant import QuantizedTensor, to_bnb, unstack

TOL = 1e-4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> (config class in both peft and jpeft, fields)
ADAPTERS = {
    "lora": (
        "LoraConfig",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "dora": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"])),
}


def adapter_config(library, name: str):
    """The config of adapter `name` from `library` (the peft or the jpeft module)."""
    config_cls, fields = ADAPTERS[name]
    return getattr(library, config_cls)(**fields)


@pytest.fixture(scope="module")
def base_of(tmp_path_factory):
    """family -> (float checkpoint dir, jpeft model, float params, input ids)."""
    cache = {}

    def build(family: str):
        if family not in cache:
            cache[family] = build_base(family, tmp_path_factory.mktemp(family), QLORA_SIZES)
        return cache[family]

    return build


def logits(model, params, ids, adapter=None) -> np.ndarray:
    return np.asarray(model.apply(params, jnp.asarray(ids), adapter=adapter))


def layer_weights(params) -> dict[str, QuantizedTensor]:
    """HF name (`model.layers.0.self_attn.q_proj.weight`) -> that layer's quantized weight."""
    out = {}
    for path, leaf in jpeft.tree.flatten(params).items():
        if isinstance(leaf, QuantizedTensor):
            for i, layer in enumerate(unstack(leaf)):
                out[path.replace("model.layers.", f"model.layers.{i}.")] = layer
    return out


def assert_same_bytes(ours: dict[str, QuantizedTensor], torch_state) -> None:
    """Every quantized weight's bitsandbytes entries equal the torch state dict's, byte for byte."""
    for name, q in ours.items():
        prefix = name[: -len("weight")]
        for key, value in to_bnb(q, prefix).items():
            theirs = torch_state[key].numpy()
            assert value.dtype == theirs.dtype and value.shape == theirs.shape, key
            assert value.tobytes() == theirs.tobytes(), key


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("quant_type, double_quant", BNB_CONFIGS)
def test_quantize_while_loading_matches_bitsandbytes(base_of, family, quant_type, double_quant):
    path, _, _, ids = base_of(family)
    hf = quantized_hf(path, quant_type, double_quant)
    model, params = jpeft.models.from_pretrained(
        path, quantize=quant_type, double_quant=double_quant
    )
    quantized = layer_weights(params)
    config = model.config
    assert len(quantized) == len(PROJECTIONS) * config.num_hidden_layers
    assert not isinstance(params.get("lm_head", {}).get("weight"), QuantizedTensor)
    assert_same_bytes(quantized, hf.state_dict())
    np.testing.assert_allclose(logits(model, params, ids), torch_logits(hf, ids), atol=TOL, rtol=0)


def test_other_blocksize_matches_bitsandbytes(base_of):
    path, _, _, ids = base_of("llama")
    hf = quantized_hf(path, "nf4", True, blocksize=128)
    model, params = jpeft.models.from_pretrained(
        path, quantize="nf4", double_quant=True, blocksize=128
    )
    assert_same_bytes(layer_weights(params), hf.state_dict())
    np.testing.assert_allclose(logits(model, params, ids), torch_logits(hf, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_checkpoint_loads_as_saved(
    base_of, family, quant_type, double_quant, tmp_path
):
    path, _, _, ids = base_of(family)
    saved = save_quantized(path, tmp_path / "bnb", quant_type, double_quant)
    model, params = jpeft.models.from_pretrained(saved)
    assert len(layer_weights(params)) == len(PROJECTIONS) * model.config.num_hidden_layers
    assert params["model"]["norm"]["weight"].dtype == jnp.float32  # CPU compute dtype
    expected = torch_logits(load_quantized_hf(saved), ids)
    np.testing.assert_allclose(logits(model, params, ids), expected, atol=TOL, rtol=0)
    # The same as quantizing the float checkpoint while loading.
    _, requantized = jpeft.models.from_pretrained(
        path, quantize=quant_type, double_quant=double_quant
    )
    ours = layer_weights(requantized)
    for name, q in layer_weights(params).items():
        assert to_bnb(q)["weight"].tobytes() == to_bnb(ours[name])["weight"].tobytes(), name


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_peft_qlora_adapter_loads_in_jpeft(base_of, name, tmp_path):
    path, _, _, ids = base_of("qwen2")
    peft_model = peft.get_peft_model(quantized_hf(path, "nf4", True), adapter_config(peft, name))
    perturb_torch(peft_model)
    expected = torch_logits(peft_model.eval(), ids)
    peft_model.save_pretrained(tmp_path)

    model, params = jpeft.models.from_pretrained(path, quantize="nf4", double_quant=True)
    adapter = jpeft.load_pretrained(tmp_path)
    np.testing.assert_allclose(logits(model, params, ids, adapter), expected, atol=TOL, rtol=0)
    merged = jpeft.merge(params, adapter)
    assert not layer_weights(merged)  # a float tree by default
    np.testing.assert_allclose(logits(model, merged, ids), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_jpeft_qlora_adapter_loads_in_peft(base_of, name, tmp_path):
    path, _, _, ids = base_of("llama")
    model, params = jpeft.models.from_pretrained(path, quantize="fp4")
    config = adapter_config(jpeft, name)
    adapter = perturb_jax(jpeft.init_adapter(params, config, key=jax.random.key(0), model=model))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(adapter))
    jpeft.save_pretrained(adapter, tmp_path)
    loaded = peft.PeftModel.from_pretrained(quantized_hf(path, "fp4", False), tmp_path).eval()
    expected = logits(model, params, ids, adapter)
    np.testing.assert_allclose(torch_logits(loaded, ids), expected, atol=TOL, rtol=0)


def test_requantized_merge_is_bitsandbytes_quantization_of_the_merge(base_of, tmp_path):
    """PEFT's merge into a 4-bit layer dequantizes, adds the delta and quantizes again; jpeft's
    `requantize=True` gives those bytes, and keeps the weights it does not touch as they were."""
    path, _, _, ids = base_of("llama")
    peft_model = peft.get_peft_model(quantized_hf(path, "nf4", False), adapter_config(peft, "lora"))
    perturb_torch(peft_model)
    peft_model.save_pretrained(tmp_path)
    merged_torch = peft_model.merge_and_unload()

    model, params = jpeft.models.from_pretrained(path, quantize="nf4")
    adapter = jpeft.load_pretrained(tmp_path)
    requantized = jpeft.merge(params, adapter, requantize=True)
    ours, untouched = layer_weights(requantized), layer_weights(params)
    assert_same_bytes(ours, merged_torch.state_dict())
    targets = ADAPTERS["lora"][1]["target_modules"]
    for name, q in ours.items():
        if not any(f".{t}." in name for t in targets):
            assert to_bnb(q)["weight"].tobytes() == to_bnb(untouched[name])["weight"].tobytes()
    np.testing.assert_allclose(
        logits(model, requantized, ids), torch_logits(merged_torch.eval(), ids), atol=1e-3, rtol=0
    )
