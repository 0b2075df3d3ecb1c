"""Llama-family models against transformers' PyTorch implementations (float32, eager attention).

Each case builds a tiny random transformers model, saves it as safetensors, loads it with
`jpeft.models.from_pretrained` and compares logits (non-padded positions, left padding on one
row) and greedy `generate` tokens.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tiny_models import random_causal_lm

from jpeft import models, ops

BATCH, SEQ, PAD, NEW_TOKENS = 2, 12, 3, 8
SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # peaked logits: greedy decoding far from ties
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES = {
    "llama": ("LlamaConfig", dict(attention_bias=True)),
    "llama3_tied": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "mistral_window": ("MistralConfig", dict(sliding_window=4, num_hidden_layers=3)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, num_key_value_heads=1)),
    # Gemma: head_dim apart from hidden/heads; a window and softcaps that bind on 12 tokens
    "gemma": ("GemmaConfig", dict(head_dim=24, attention_bias=True)),
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=24,
            num_hidden_layers=3,
            sliding_window=5,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=2.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            head_dim=24,
            num_hidden_layers=3,
            sliding_window=5,
            sliding_window_pattern=2,
            query_pre_attn_scalar=20,
            final_logit_softcapping=2.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            rope_local_base_freq=100.0,
        ),
    ),
}


def build_hf_model(case: str, seed: int = 0):
    """The tiny random transformers model of `case` (see `tiny_models.random_causal_lm`)."""
    config_cls, overrides = CASES[case]
    return random_causal_lm(config_cls, {**SMALL, **overrides}, seed)


def make_inputs(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random `input_ids` [B, S] and a mask with `PAD` left-padding tokens on row 0."""
    ids = np.random.default_rng(0).integers(0, vocab_size, (BATCH, SEQ))
    mask = np.ones((BATCH, SEQ), np.int64)
    mask[0, :PAD] = 0
    return ids, mask


def hf_outputs(model, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' logits [B, S, V] and greedy tokens [B, S + NEW_TOKENS]."""
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        logits = model(input_ids=ids_t, attention_mask=mask_t).logits.float().numpy()
        tokens = model.generate(
            ids_t, attention_mask=mask_t, max_new_tokens=NEW_TOKENS, do_sample=False
        ).numpy()
    return logits, tokens


def assert_logits_close(ours: jax.Array, theirs: np.ndarray, mask: np.ndarray) -> None:
    """Max abs difference over non-padded positions within 1e-4."""
    diff = np.abs(np.asarray(ours, np.float32) - theirs)[mask.astype(bool)]
    assert diff.max() < 1e-4, f"max abs logit diff {diff.max():.3g}"


@pytest.fixture(scope="module", params=list(CASES))
def loaded(request, tmp_path_factory):
    """(case, jpeft model, params, hf logits, hf tokens, ids, mask) for one saved case."""
    hf = build_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    ids, mask = make_inputs(hf.config.vocab_size)
    logits, tokens = hf_outputs(hf, ids, mask)
    model, params = models.from_pretrained(path, dtype=jnp.float32)
    return request.param, model, params, logits, tokens, ids, mask


def test_logits_match_transformers(loaded):
    _, model, params, hf_logits, _, ids, mask = loaded
    logits = jax.jit(model.apply)(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert logits.shape == (BATCH, SEQ, model.config.vocab_size)
    assert_logits_close(logits, hf_logits, mask)


@pytest.mark.parametrize("loaded", ["llama3_tied"], indirect=True)
def test_hidden_states_then_logits(loaded):
    _, model, params, hf_logits, _, ids, mask = loaded
    h = jax.jit(model.hidden_states)(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert h.shape == (BATCH, SEQ, model.config.hidden_size)
    assert_logits_close(jax.jit(model.logits)(params, h), hf_logits, mask)


def test_generate_matches_transformers(loaded):
    _, model, params, _, hf_tokens, ids, mask = loaded
    tokens = model.generate(params, jnp.asarray(ids), NEW_TOKENS, attention_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(tokens), hf_tokens)


def test_param_layout(loaded):
    case, model, params, *_ = loaded
    c = model.config
    layers = params["model"]["layers"]
    q = layers["self_attn"]["q_proj"]["weight"]
    assert q.shape == (c.num_hidden_layers, c.num_attention_heads * c.head_dim, c.hidden_size)
    assert ("lm_head" in params) != c.tie_word_embeddings
    assert ("bias" in layers["self_attn"]["q_proj"]) == (case in ("llama", "qwen2", "gemma"))
    assert ("bias" in layers["self_attn"]["o_proj"]) == (case in ("llama", "gemma"))
    assert ("q_norm" in layers["self_attn"]) == (case in ("qwen3", "gemma3"))
    assert ("pre_feedforward_layernorm" in layers) == (case in ("gemma2", "gemma3"))
    init = jax.eval_shape(model.init, jax.random.key(0))
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)


def load_from_torch(hf):
    """(model, params) straight from a transformers model's state dict (no files)."""
    model = models.from_hf_config(hf.config)
    state = ((name, t.numpy()) for name, t in hf.state_dict().items())
    return model, models.place_tensors(model.config, state)


def test_explicit_position_ids():
    hf = build_hf_model("qwen2")
    ids, mask = make_inputs(hf.config.vocab_size)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        hf_logits = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    model, params = load_from_torch(hf)
    logits = jax.jit(model.apply)(
        params, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=positions
    )
    assert_logits_close(logits, hf_logits, mask)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LowRankDelta:
    """Stand-in for an adapted weight node: the weight `w + b @ a` without merging it."""

    w: jax.Array
    a: jax.Array
    b: jax.Array

    def linear(self, x, bias):
        return ops.dense(x, self.w, bias) + (x @ self.a.T) @ self.b.T

    def embed(self, ids):
        raise NotImplementedError


def test_adapted_weight_nodes_pass_through_scan():
    """A weight leaf may be a pytree node with stacked leaves; scan hands it over per layer."""
    model, params = load_from_torch(build_hf_model("llama"))
    rng = np.random.default_rng(1)
    adapted, merged = jax.tree.map(lambda x: x, params), jax.tree.map(lambda x: x, params)
    c = model.config
    layers, rank = c.num_hidden_layers, 2
    targets = [
        (("model", "layers", "mlp", "down_proj"), (layers, rank, 96), (layers, 64, rank)),
        (("lm_head",), (rank, 64), (c.vocab_size, rank)),
    ]
    for path, shape_a, shape_b in targets:
        a, b = rng.normal(size=shape_a), rng.normal(size=shape_b)
        module_adapted, module_merged = adapted, merged
        for key in path:
            module_adapted, module_merged = module_adapted[key], module_merged[key]
        w = module_adapted["weight"]
        module_adapted["weight"] = LowRankDelta(w, jnp.asarray(a, w.dtype), jnp.asarray(b, w.dtype))
        module_merged["weight"] = w + jnp.asarray(b @ a, w.dtype)
    ids, mask = make_inputs(model.config.vocab_size)
    ours = jax.jit(model.apply)(adapted, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    ref = jax.jit(model.apply)(merged, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_config_fields():
    model = models.from_hf_config(build_hf_model("qwen3").config)
    c = model.config
    assert (c.model_type, c.head_dim, c.num_key_value_heads, c.qk_norm) == ("qwen3", 32, 1, True)
    mistral = models.from_hf_config(build_hf_model("mistral_window").config.to_dict()).config
    assert mistral.sliding_window == 4 and set(mistral.layer_types) == {"sliding_attention"}
    llama3 = models.from_hf_config(build_hf_model("llama3_tied").config).config
    assert llama3.rope_scaling.rope_type == "llama3" and llama3.tie_word_embeddings
    assert hash(model) == hash(models.from_hf_config(build_hf_model("qwen3").config))


def test_sharded_and_bf16_checkpoints(tmp_path):
    hf = build_hf_model("llama", seed=1).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids, mask = make_inputs(hf.config.vocab_size)
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    )
    hf_logits, _ = hf_outputs(hf32.eval(), ids, mask)
    model, params = models.from_pretrained(tmp_path, dtype=jnp.float32)
    assert params["model"]["embed_tokens"]["weight"].dtype == jnp.float32
    logits = jax.jit(model.apply)(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert_logits_close(logits, hf_logits, mask)
    _, bf16_params = models.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert bf16_params["lm_head"]["weight"].dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A saved tiny llama checkpoint directory, for the error tests to damage copies of."""
    path = tmp_path_factory.mktemp("llama_ok")
    build_hf_model("llama").save_pretrained(path, safe_serialization=True)
    return path


def copy_checkpoint(src, dst, config_edit=None, drop_weights=False):
    """Copy a checkpoint dir, optionally editing config.json and leaving the weights out."""
    config = json.loads((src / "config.json").read_text())
    config.update(config_edit or {})
    (dst / "config.json").write_text(json.dumps(config))
    if not drop_weights:
        (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_pretrained(tmp_path)


def test_missing_weights(saved_llama, tmp_path):
    copy_checkpoint(saved_llama, tmp_path, drop_weights=True)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="convert them to safetensors"):
        models.from_pretrained(tmp_path)


def test_unknown_model_type(saved_llama, tmp_path):
    copy_checkpoint(saved_llama, tmp_path, {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="'gpt2'.*llama"):
        models.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        models.from_hf_config(
            {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}
        )


def test_wrong_shape_and_missing_tensor(saved_llama, tmp_path):
    copy_checkpoint(saved_llama, tmp_path, {"intermediate_size": 80})
    with pytest.raises(
        ValueError, match=r"mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), expected"
    ):
        models.from_pretrained(tmp_path)
    copy_checkpoint(saved_llama, tmp_path, {"num_hidden_layers": 3})
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.2\."):
        models.from_pretrained(tmp_path)


def test_gemma_config_errors_name_the_field():
    base = dict(SMALL, model_type="gemma3_text", head_dim=24)
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        models.from_hf_config({**base, "use_bidirectional_attention": True})
    local = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0}
    with pytest.raises(ValueError, match="sliding layers' rope_type='linear'"):
        models.from_hf_config(
            {**base, "rope_parameters": {"full_attention": {}, "sliding_attention": local}}
        )
    # Gemma 1's legacy "gelu" is the tanh approximation, as transformers reads it
    assert (
        models.from_hf_config(
            {**base, "model_type": "gemma", "hidden_act": "gelu"}
        ).config.hidden_act
        == "gelu_pytorch_tanh"
    )
