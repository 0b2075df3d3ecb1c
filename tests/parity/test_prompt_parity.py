"""Prompt tuning, p-tuning (MLP, LSTM) and prefix tuning against PyTorch PEFT, both directions.

On tiny random Llama and Qwen2 models (GQA, so prefixes are sized for the key/value heads): a PEFT
adapter saved by PEFT gives PEFT's logits (virtual positions included) and greedy tokens in jpeft,
with a left-padded batch; jpeft's adapter saved by jpeft loads in `PeftModel.from_pretrained` with
jpeft's logits, the same saved key, shape and model-derived config fields as PEFT's; and PEFT's
training-mode encoders (MLP, bidirectional LSTM, prefix projection) copied into jpeft compute the
same prompt, so the encoders themselves (not only their saved outputs) are PEFT's.
"""

from __future__ import annotations

import json

import hf_bases
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tiny_models import random_causal_lm

import jpeft

TOL = 1e-4
# transformers' generate would stop at EOS; jpeft's model.generate does not.
SMALL = {**hf_bases.SMALL, "initializer_range": 0.2, "eos_token_id": None}
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=4)),  # scaled embeddings
}
METHODS = {
    "prompt_tuning": ("PromptTuningConfig", dict(num_virtual_tokens=5)),
    "p_tuning_mlp": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=24)),
    "p_tuning_lstm": (
        "PromptEncoderConfig",
        dict(num_virtual_tokens=4, encoder_reparameterization_type="LSTM", encoder_hidden_size=12),
    ),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=5)),
    "prefix_projection": (
        "PrefixTuningConfig",
        dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=20),
    ),
}
CASES = [(family, method) for family in ("llama", "qwen2") for method in METHODS]
# The prompt and p-tuning encoders do not depend on the model; the prefix layout does (GQA).
ENCODER_CASES = [("llama", method) for method in METHODS] + [
    ("qwen2", "prefix"),
    ("qwen2", "prefix_projection"),
]
MODEL_FIELDS = ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")


@pytest.fixture(scope="module")
def base_of(tmp_path_factory):
    """family -> (checkpoint dir, jpeft model, params), built once per family."""
    cache = {}

    def build(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            config_cls, overrides = FAMILIES[family]
            random_causal_lm(config_cls, {**SMALL, **overrides}).save_pretrained(path)
            cache[family] = (path, *jpeft.models.from_pretrained(path))
        return cache[family]

    return build


def inputs():
    """Token ids [2, 7] and a mask with the second row left-padded by two."""
    ids = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (2, 7))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def peft_config(method: str):
    cls, kwargs = METHODS[method]
    return getattr(peft, cls)(task_type="CAUSAL_LM", **kwargs)


def jpeft_config(method: str):
    """No task_type: jpeft fills in CAUSAL_LM, without which PEFT would ignore the prompt."""
    cls, kwargs = METHODS[method]
    return getattr(jpeft, cls)(**kwargs)


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


def torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.numpy()


def torch_generate(model, ids, mask, new_tokens: int) -> np.ndarray:
    """Greedy decoding with PEFT's forward: each step reruns the whole sequence, positions counted
    over the attention mask as `generate` counts them (PEFT drops them for virtual tokens).

    Not `model.generate`: from transformers 5.24 on, PEFT's cached `generate` with prompt-learning
    adapters departs from its own forward after the first new token (rerunning the forward on
    the same sequence picks another token), and an uncached one loses prefix tuning's prefix.
    """
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        for _ in range(new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids.numpy()


def jpeft_logits(model, params, adapter, ids, mask) -> np.ndarray:
    out = model.apply(params, jnp.asarray(ids), adapter=adapter, attention_mask=jnp.asarray(mask))
    return np.asarray(out)


def perturb(adapter: jpeft.Adapter) -> jpeft.Adapter:
    """Move every leaf away from its init (a zero-initialised projection would hide bugs)."""
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("family, method", CASES)
def test_peft_adapter_loads_in_jpeft(base_of, family, method, tmp_path):
    path, model, params = base_of(family)
    ids, mask = inputs()
    peft_model = peft.get_peft_model(load_hf(path), peft_config(method)).eval()
    expected = torch_logits(peft_model, ids, mask)
    expected_tokens = torch_generate(peft_model, ids, mask, 6)
    peft_model.save_pretrained(tmp_path)

    adapter = jpeft.load_pretrained(tmp_path)
    got = jpeft_logits(model, params, adapter, ids, mask)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    tokens = model.generate(params, jnp.asarray(ids), 6, adapter=adapter, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(tokens), expected_tokens)


@pytest.mark.parametrize("family, method", CASES)
def test_jpeft_adapter_loads_in_peft(base_of, family, method, tmp_path):
    path, model, params = base_of(family)
    ids, mask = inputs()
    fresh = jpeft.init_adapter(params, jpeft_config(method), key=jax.random.key(0), model=model)
    adapter = perturb(fresh)
    expected = jpeft_logits(model, params, adapter, ids, mask)
    jpeft.save_pretrained(adapter, tmp_path / "jpeft")

    loaded = peft.PeftModel.from_pretrained(load_hf(path), tmp_path / "jpeft").eval()
    np.testing.assert_allclose(torch_logits(loaded, ids, mask), expected, atol=TOL, rtol=0)

    peft.get_peft_model(load_hf(path), peft_config(method)).save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "jpeft" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    our_config = json.loads((tmp_path / "jpeft" / "adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in (
        *MODEL_FIELDS,
        "encoder_hidden_size",
        "peft_type",
        "num_virtual_tokens",
        "task_type",
    ):
        assert our_config.get(field) == their_config.get(field), field


@pytest.mark.parametrize("family, method", ENCODER_CASES)
def test_training_encoders_match_peft(base_of, family, method):
    """PEFT's trainable encoder copied into jpeft: the same parameter names and shapes as jpeft
    initialises, and the same logits (PEFT runs the encoder in training mode)."""
    path, model, params = base_of(family)
    ids, mask = inputs()
    peft_model = peft.get_peft_model(load_hf(path), peft_config(method)).eval()
    state = peft_model.prompt_encoder["default"].state_dict()
    with torch.no_grad():
        for value in state.values():
            value.add_(0.3 * torch.randn_like(value))
    expected = torch_logits(peft_model, ids, mask)

    fresh = jpeft.init_adapter(params, jpeft_config(method), key=jax.random.key(0), model=model)
    pieces = fresh.weights["prompt_encoder"]
    assert {k: tuple(v.shape) for k, v in pieces.items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    copied = fresh.replace(
        weights={"prompt_encoder": {k: jnp.asarray(v.numpy()) for k, v in state.items()}}
    )
    got = jpeft_logits(model, params, copied, ids, mask)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def word_level_tokenizer(path, words: list[str]):
    """A tiny local tokenizer directory (whitespace words, a BOS token) for TEXT init."""
    import tokenizers

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>"
    )
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("family, num_virtual_tokens", [("llama", 3), ("llama", 8), ("gemma3", 3)])
def test_text_init_matches_peft(base_of, family, num_virtual_tokens, tmp_path):
    """TEXT init: the init text's token embeddings (BOS included), cut or repeated to T, as the
    model's embedding layer gives them (Gemma's scaled)."""
    path, model, params = base_of(family)
    word_level_tokenizer(tmp_path, ["classify", "the", "topic", "of", "this", "article"])
    kwargs = dict(
        num_virtual_tokens=num_virtual_tokens,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the topic",
        tokenizer_name_or_path=str(tmp_path),
    )
    peft_model = peft.get_peft_model(
        load_hf(path), peft.PromptTuningConfig(task_type="CAUSAL_LM", **kwargs)
    )
    expected = peft_model.prompt_encoder["default"].embedding.weight.detach().numpy()
    adapter = jpeft.init_adapter(
        params, jpeft.PromptTuningConfig(**kwargs), key=jax.random.key(0), model=model
    )
    np.testing.assert_array_equal(
        np.asarray(adapter.weights["prompt_encoder"]["embedding.weight"]), expected
    )
