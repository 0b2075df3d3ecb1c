"""Merged exports as Hugging Face checkpoints, checked by transformers' own `from_pretrained`.

For every weight method, the exported folder loaded by transformers gives jpeft's logits with the
adapter applied (and merged); every Llama-family architecture, a GGUF base, shards, bf16 and a
bitsandbytes 4-bit export load the same way. Prompt methods, existing folders and failures leave
nothing behind.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_conformance import fresh, is_weight_method, perturbed

import jpeft
from jpeft.export import save_merged_checkpoint
from jpeft.export.hf_checkpoint import parse_size

TOL = 1e-4
WEIGHT_METHODS = [name for name in sorted(jpeft.registered()) if is_weight_method(name)]
PROMPT_METHODS = [name for name in sorted(jpeft.registered()) if not is_weight_method(name)]


def transformers_logits(folder, ids, dtype=torch.float32) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def assert_close(actual, expected, tol=TOL) -> None:
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= tol * scale, np.abs(actual - expected).max() / scale


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny word-level Llama of the conformance suite: (dir, model, params, ids)."""
    from tiny_models import save_word_level_llama

    path = save_word_level_llama(tmp_path_factory.mktemp("tiny"))
    model, params = jpeft.models.from_pretrained(path)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (4, 6)).astype(np.int32)
    return path, model, params, jnp.asarray(ids)


@pytest.mark.parametrize("name", WEIGHT_METHODS)
def test_transformers_loads_the_merged_export(base, name, tmp_path):
    path, model, params, ids = base
    adapter = perturbed(fresh(base, name))
    out = save_merged_checkpoint(tmp_path / "merged", path, params, adapter)
    adapted = np.asarray(model.apply(params, ids, adapter=adapter))
    assert_close(transformers_logits(out, ids), adapted)
    reloaded_model, reloaded = jpeft.models.from_pretrained(out)
    assert_close(np.asarray(reloaded_model.apply(reloaded, ids)), adapted)


def test_files_config_and_tokenizer(base, tmp_path):
    path, model, params, ids = base
    adapter = perturbed(fresh(base, "lora"))
    out = save_merged_checkpoint(tmp_path / "merged", path, params, adapter)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((out / "config.json").read_text())
    original = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    assert {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} == {
        k: v for k, v in original.items() if k not in ("dtype", "torch_dtype")
    }
    text = "the market vote film"
    ours = transformers.AutoTokenizer.from_pretrained(out)
    assert ours(text).input_ids == transformers.AutoTokenizer.from_pretrained(path)(text).input_ids


def test_untied_head_from_modules_to_save(base, tmp_path):
    """A trained copy of a tied head becomes a head of its own: the export unties it."""
    path, model, params, ids = base
    config = jpeft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    adapter = perturbed(jpeft.init_adapter(params, config, key=jax.random.key(0), model=model))
    out = save_merged_checkpoint(tmp_path / "merged", path, params, adapter)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert_close(
        transformers_logits(out, ids), np.asarray(model.apply(params, ids, adapter=adapter))
    )


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_every_family(family, tmp_path):
    from hf_bases import build_base

    path, model, params, ids = build_base(family, tmp_path / "base")
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    adapter = perturbed(jpeft.init_adapter(params, config, key=jax.random.key(0), model=model))
    out = save_merged_checkpoint(tmp_path / "merged", path, params, adapter, tokenizer=False)
    assert_close(
        transformers_logits(out, ids), np.asarray(model.apply(params, ids, adapter=adapter))
    )


def test_a_base_without_tokenizer_needs_tokenizer_false(tmp_path):
    from hf_bases import build_base

    path, _, params, _ = build_base("llama", tmp_path / "base")
    with pytest.raises(ValueError, match="holds no tokenizer.*--no-tokenizer"):
        save_merged_checkpoint(tmp_path / "merged", path, params)
    assert not (tmp_path / "merged").exists()


def test_shards_and_bfloat16(base, tmp_path):
    path, model, params, ids = base
    adapter = perturbed(fresh(base, "lora"))
    out = save_merged_checkpoint(
        tmp_path / "merged", path, params, adapter, dtype="bfloat16", max_shard_size="20KB"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    merged = jpeft.merge(params, adapter)
    expected = np.asarray(model.apply(merged, ids))
    actual = transformers_logits(out, ids, torch.bfloat16)
    assert_close(actual, expected, tol=5e-2)  # bfloat16 weights and activations
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_gguf_base(tmp_path):
    from test_gguf import build_hf_model, write_gguf

    gguf = write_gguf(tmp_path / "base.gguf", build_hf_model("llama"))
    model, params = jpeft.models.from_pretrained(gguf)
    config = jpeft.LoraConfig(r=4, target_modules="all-linear")
    adapter = perturbed(jpeft.init_adapter(params, config, key=jax.random.key(0), model=model))
    out = save_merged_checkpoint(tmp_path / "merged", gguf, params, adapter)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 7))
    assert_close(
        transformers_logits(out, ids), np.asarray(model.apply(params, ids, adapter=adapter))
    )
    ours = transformers.AutoTokenizer.from_pretrained(out)
    theirs = jpeft.models.load_tokenizer(gguf)
    text = "hello world"
    assert ours(text).input_ids == theirs(text).input_ids
    assert ours.chat_template == theirs.chat_template


def test_4bit_base_dequantized_or_kept(tmp_path):
    """bitsandbytes' CPU matmul needs layers wider than its blocksize: QLORA_SIZES."""
    from bnb_bases import QLORA_SIZES, load_quantized_hf
    from hf_bases import build_base, torch_logits

    path, model, _, ids = build_base("llama", tmp_path / "base", QLORA_SIZES)
    _, params = jpeft.models.from_pretrained(path, quantize="nf4")
    config = jpeft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
    adapter = perturbed(jpeft.init_adapter(params, config, key=jax.random.key(0), model=model))
    export = dict(params=params, adapter=adapter, tokenizer=False)
    float_out = save_merged_checkpoint(tmp_path / "float", path, **export)
    merged = np.asarray(model.apply(jpeft.merge(params, adapter), ids))
    assert_close(transformers_logits(float_out, ids), merged)
    kept = save_merged_checkpoint(tmp_path / "nf4", path, **export, keep_4bit=True)
    config = json.loads((kept / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_type"] == "nf4" and config["load_in_4bit"] is True
    requantized = np.asarray(model.apply(jpeft.merge(params, adapter, requantize=True), ids))
    _, reloaded = jpeft.models.from_pretrained(kept)
    np.testing.assert_array_equal(model.apply(reloaded, ids), requantized)
    assert_close(torch_logits(load_quantized_hf(kept), ids), requantized)


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_prompt_adapters_are_refused(base, name, tmp_path):
    path, _, params, _ = base
    with pytest.raises(ValueError, match="cannot be exported merged.*adapter folder"):
        save_merged_checkpoint(tmp_path / "merged", path, params, fresh(base, name))
    assert list(tmp_path.iterdir()) == []


def test_nothing_replaced_nothing_half_written(base, tmp_path, monkeypatch):
    path, _, params, _ = base
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="taken already exists"):
        save_merged_checkpoint(tmp_path / "taken", path, params)
    with pytest.raises(ValueError, match="dtype 'int8'.*float32"):
        save_merged_checkpoint(tmp_path / "merged", path, params, dtype="int8")

    def broken_tokenizer_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(
        transformers.PreTrainedTokenizerFast, "save_pretrained", broken_tokenizer_save
    )
    with pytest.raises(OSError, match="disk full"):
        save_merged_checkpoint(tmp_path / "merged", path, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize(
    "size, expected", [(1000, 1000), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("1.5MB", 1_500_000)]
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["0MB", "-1GB", "big", 0, True])
def test_parse_size_errors(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


def test_export_command(base, tmp_path):
    from jpeft import cli

    path, model, params, ids = base
    adapter = perturbed(fresh(base, "lora"))
    jpeft.save_pretrained(adapter, tmp_path / "adapter")
    args = ["export", "--model", str(path), "--adapter", str(tmp_path / "adapter")]
    assert cli.main([*args, "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    expected = np.asarray(model.apply(params, ids, adapter=adapter))
    assert_close(transformers_logits(tmp_path / "merged", ids), expected)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "int8"], "--dtype 'int8': choose one of float32, float16, bfloat16"),
        (["--max-shard-size", "huge"], "max_shard_size 'huge'"),
        (["--outtype", "q8_0"], "--outtype applies to the gguf formats"),
        (["--format", "gguf-lora"], "--format gguf-lora exports an adapter: give --adapter"),
        (["--format", "gguf", "--dtype", "float16"], "--dtype and --quantize apply to --format hf"),
    ],
)
def test_export_command_errors(base, tmp_path, capsys, extra, message):
    from job_helpers import run_cli_error

    path = base[0]
    args = ["export", "--model", str(path), "--out", str(tmp_path / "out"), *extra]
    assert message in run_cli_error(args, capsys)
    assert not (tmp_path / "out").exists()
