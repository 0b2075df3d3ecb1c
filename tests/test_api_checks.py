"""Misuse of the model API and damaged model files are refused with errors that name the culprit.

Model inputs (`jpeft.models.inputs`): dropout keys, token id dtypes, ranks and ranges, mask and
position shapes, `generate`'s length, param dtypes; the `check_ids` opt-in checks the id range
inside a jitted train step. Model files: non-float or non-finite tensors in safetensors and GGUF
checkpoints, and NaN/inf weights handed to the 4-bit quantizer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import partial

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from tiny_models import TINY_LLAMA

import jpeft
from jpeft import models, train
from jpeft import tree as jtree
from jpeft.models import hf_loading

VOCAB = TINY_LLAMA["vocab_size"]
IDS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 5)), jnp.int32)


@pytest.fixture(scope="module")
def tiny():
    """(model, params) of the tiny Llama."""
    model = models.from_hf_config(TINY_LLAMA)
    return model, model.init(jax.random.key(0))


def call(entry: str, model, params, ids, **kwargs):
    """Call model entry point `entry` ("apply", "hidden_states", "jit_apply" or "generate")."""
    if entry == "generate":
        return model.generate(params, ids, 2, **kwargs)
    if entry == "jit_apply":
        return jax.jit(model.apply)(params, ids, **kwargs)
    return getattr(model, entry)(params, ids, **kwargs)


# ---------------------------------------------------------------------------------------------
# model inputs


@pytest.mark.parametrize(
    "key, given",
    [
        (0, r"(int 0|int32\[\])"),  # traced under jit: int32[]
        (jnp.zeros(2, jnp.int32), r"int32\[2\]"),
        (jnp.zeros(3, jnp.uint32), r"uint32\[3\]"),
        (jax.random.split(jax.random.key(0)), r"key<fry>\[2\]"),
        (jax.random.split(jax.random.PRNGKey(0)), r"uint32\[2, 2\]"),
    ],
)
@pytest.mark.parametrize("entry", ["apply", "hidden_states", "jit_apply"])
def test_bad_dropout_key(tiny, entry, key, given):
    model, params = tiny
    with pytest.raises(ValueError, match=rf"dropout_key must be a JAX PRNG key, got {given}.*"):
        call(entry, model, params, IDS, dropout_key=key)


def test_typed_and_raw_keys_are_accepted(tiny):
    model, params = tiny
    for key in (jax.random.key(1), jax.random.PRNGKey(1)):
        jax.eval_shape(lambda k: model.apply(params, IDS, dropout_key=k), key)


@pytest.mark.parametrize(
    "ids, message",
    [
        (IDS.astype(jnp.float32), "integer token ids, got dtype float32"),
        (IDS > 3, "integer token ids, got dtype bool"),
        (IDS[0], r"\[batch, seq\].*got shape \(5,\)"),
        (IDS[None], r"\[batch, seq\].*got shape \(1, 2, 5\)"),
        (IDS[:0], r"batch, seq > 0, got shape \(0, 5\)"),
        (IDS[:, :0], r"batch, seq > 0, got shape \(2, 0\)"),
        (IDS.tolist(), "integer array.*got list"),
    ],
    ids=["float", "bool", "rank1", "rank3", "no_rows", "no_tokens", "list"],
)
@pytest.mark.parametrize("entry", ["apply", "hidden_states", "jit_apply", "generate"])
def test_bad_input_ids(tiny, entry, ids, message):
    if entry == "generate" and isinstance(ids, list):
        pytest.skip("generate takes lists: it converts them with jnp.asarray")
    model, params = tiny
    with pytest.raises(ValueError, match=f"input_ids .*{message}"):
        call(entry, model, params, ids)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("attention_mask", (2, 4)),
        ("attention_mask", (1, 5)),
        ("attention_mask", (5,)),
        ("position_ids", (2, 4)),
        ("position_ids", (3, 5)),
        ("position_ids", (5,)),
    ],
)
@pytest.mark.parametrize("entry", ["apply", "hidden_states", "jit_apply", "generate"])
def test_mask_and_positions_must_match_input_ids(tiny, entry, name, shape):
    if entry == "generate" and name == "position_ids":
        pytest.skip("generate takes no position_ids")
    model, params = tiny
    with pytest.raises(ValueError, match=rf"{name} has shape {re.escape(str(shape))}.*\(2, 5\)"):
        call(entry, model, params, IDS, **{name: jnp.ones(shape, jnp.int32)})


def test_position_ids_broadcast_over_the_batch_still_work(tiny):
    model, params = tiny
    ones = jnp.ones((1, 5), jnp.int32)
    jax.eval_shape(lambda p: model.apply(params, IDS, position_ids=p), ones)


def with_bad_id(bad: int) -> tuple[jax.Array, str]:
    """`IDS` with one id set to `bad`, and the message that names its range."""
    ids = IDS.at[1, 2].set(bad)
    low, high = int(ids.min()), int(ids.max())
    message = rf"input_ids holds token ids outside \[0, vocab_size={VOCAB}\): min {low}, max {high}"
    return ids, message


@pytest.mark.parametrize("bad", [-1, VOCAB, 10**6])
@pytest.mark.parametrize("entry", ["apply", "hidden_states", "generate"])
def test_concrete_ids_out_of_range(tiny, entry, bad):
    model, params = tiny
    ids, message = with_bad_id(bad)
    with pytest.raises(ValueError, match=message):
        call(entry, model, params, ids)


def test_checked_train_step_catches_ids_out_of_range_inside_jit(tiny, caplog):
    """`check_ids=True` + `models.checked` around a jitted LoRA train step: good batches train,
    each bad id raises ValueError naming input_ids, and the step compiles once for all."""
    model, params = tiny
    model = dataclasses.replace(model, check_ids=True)
    adapter = jpeft.init_adapter(
        params, jpeft.LoraConfig(r=2, target_modules=["q_proj"]), key=jax.random.key(0)
    )
    optimizer = optax.sgd(1e-2)
    step = models.checked(train.make_train_step(model, optimizer))
    opt_state = train.init_opt_state(optimizer, jpeft.partition(adapter)[0])
    with jax.log_compiles(True):
        for _ in range(2):
            adapter, opt_state, loss = step(
                params, adapter, opt_state, {"input_ids": IDS, "labels": IDS}
            )
            assert np.isfinite(loss)
        for bad in (-1, VOCAB, VOCAB + 7):
            bad_ids, message = with_bad_id(bad)
            kept = jax.tree.map(jnp.copy, (adapter, opt_state))  # the step donates them
            with pytest.raises(ValueError, match=message):
                step(params, *kept, {"input_ids": bad_ids, "labels": IDS})
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(compiles) == 1


@pytest.mark.parametrize("max_new_tokens", [-1, 2.0, True, "3", None])
def test_generate_max_new_tokens_must_be_an_int(tiny, max_new_tokens):
    model, params = tiny
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 0"):
        model.generate(params, IDS, max_new_tokens)


def test_generate_past_max_positions(tiny):
    model, params = tiny
    limit = TINY_LLAMA["max_position_embeddings"]
    with pytest.raises(ValueError, match=rf"max_new_tokens={limit - 4}.*{limit}"):
        model.generate(params, IDS, limit - 4)
    assert model.generate(params, IDS, 0).shape == IDS.shape


@pytest.mark.parametrize("dtype", [jnp.int32, "uint8", bool, jnp.complex64, "no-such-dtype"])
@pytest.mark.parametrize("entry", ["init", "from_pretrained"])
def test_param_dtype_must_be_floating_point(tiny, hf_checkpoint, entry, dtype):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"dtype=\S+ is not a floating-point dtype"):
        if entry == "init":
            model.init(jax.random.key(0), dtype)
        else:
            models.from_pretrained(hf_checkpoint, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# model files


def hf_state_dict(params) -> dict[str, np.ndarray]:
    """The HF-named tensors of jpeft `params` of the tiny Llama, per layer."""
    config = models.from_hf_config(TINY_LLAMA).config
    return {
        name: np.asarray(jtree.layer_of(jtree.get_path(params, ".".join(path)), layer))
        for name, (path, layer) in hf_loading.hf_names(config).items()
    }


def write_checkpoint(path, tensors) -> str:
    """`tensors` as a HF checkpoint directory of the tiny Llama at `path`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
    return str(path)


# HF module -> llama.cpp's name, for `write_gguf`.
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GGUF_TOP_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of HF weight `hf_name`."""
    module = hf_name.removesuffix(".weight")
    if module in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[module]}.weight"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}.weight"


def write_gguf(path, tensors) -> str:
    """The tiny Llama as an F32 GGUF file (q/k rows left unpermuted: the values do not matter)."""
    c = TINY_LLAMA
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    for name, array in tensors.items():
        writer.add_tensor(gguf_name(name), array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def tensors(tiny):
    return hf_state_dict(tiny[1])


@pytest.fixture(scope="module")
def hf_checkpoint(tensors, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("good"), tensors)


def test_the_written_files_load(tensors, tmp_path):
    for path in (
        write_checkpoint(tmp_path / "hf", tensors),
        write_gguf(tmp_path / "m.gguf", tensors),
    ):
        _, params = models.from_pretrained(path)
        np.testing.assert_array_equal(
            params["model"]["norm"]["weight"], tensors["model.norm.weight"]
        )


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("model.layers.1.mlp.up_proj.weight", np.int32),
        ("model.layers.0.self_attn.q_proj.weight", np.uint8),
        ("model.norm.weight", np.bool_),
        ("model.embed_tokens.weight", np.int64),
    ],
)
def test_non_float_tensor_is_refused(tensors, tmp_path, name, dtype):
    path = write_checkpoint(tmp_path, {**tensors, name: tensors[name].astype(dtype)})
    message = rf"{re.escape(path)}: tensor '{re.escape(name)}' has dtype {np.dtype(dtype)}"
    with pytest.raises(ValueError, match=f"{message}, but a float weight is expected"):
        models.from_pretrained(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "fmt, name",
    [
        ("safetensors", "model.layers.1.self_attn.v_proj.weight"),
        ("safetensors", "model.embed_tokens.weight"),
        ("gguf", "model.layers.0.mlp.down_proj.weight"),
        ("safetensors_nf4", "model.layers.1.mlp.gate_proj.weight"),
    ],
)
def test_non_finite_weight_in_model_file(tensors, tmp_path, fmt, name, bad):
    damaged = tensors[name].copy()
    damaged.flat[7] = bad
    edited = {**tensors, name: damaged}
    if fmt == "gguf":
        path = write_gguf(tmp_path / "model.gguf", edited)
    else:
        path = write_checkpoint(tmp_path, edited)
    quantize = "nf4" if fmt == "safetensors_nf4" else None
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(name)}' holds NaN or inf values"):
        models.from_pretrained(path, quantize=quantize)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("entry", ["jax", "numpy", "quantize_params"])
def test_quantize_refuses_non_finite_weights(tiny, entry, bad):
    _, params = tiny
    path = "model.layers.mlp.up_proj.weight"
    stacked = jtree.get_path(params, path).at[1, 3, 5].set(bad)
    if entry == "quantize_params":
        name = "model.layers.1.mlp.up_proj.weight"
        run = partial(jpeft.quant.quantize_params, jtree.set_path(params, path, stacked))
    else:
        weight = stacked[1] if entry == "jax" else np.asarray(stacked[1])
        name = "up_proj"
        run = partial(jpeft.quant.quantize, weight, "nf4", name=name)
    with pytest.raises(ValueError, match=rf"cannot quantize {re.escape(name)}: 1 of its"):
        run()
