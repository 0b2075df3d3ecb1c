"""The README's code blocks run as written (on a tiny checkpoint) and its loop trains."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest
import torch
import transformers

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def test_training_loop_block_runs_and_learns(checkpoint, tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "optax.apply_updates" in b)
    lines = [line for line in block.strip().splitlines() if line.strip()]
    assert len(lines) < 20, "the README promises a loop in under 20 lines"
    ids = jax.random.randint(jax.random.key(0), (4, 16), 0, 64)
    batch = {"input_ids": ids, "labels": ids}
    monkeypatch.chdir(tmp_path)
    scope = {"batches": [batch] * 25}
    exec(block.replace("path/to/hf_checkpoint", str(checkpoint)), scope)
    first = float(
        scope["jpeft"].train.causal_lm_loss(scope["model"].apply(scope["params"], ids), ids)
    )
    assert float(scope["loss"]) < first - 0.05
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()


def test_api_block_runs(checkpoint, tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "jpeft.merge(params, adapter)" in b)
    monkeypatch.chdir(tmp_path)
    scope = {"input_ids": jax.random.randint(jax.random.key(0), (2, 5), 0, 64)}
    exec(block.replace("path/to/hf_checkpoint", str(checkpoint)), scope)
    assert scope["logits"].shape == (2, 5, 64)


def test_methods_block_runs(checkpoint, tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "jpeft.PrefixTuningConfig(" in b)
    monkeypatch.chdir(tmp_path)
    scope = {"input_ids": jax.random.randint(jax.random.key(0), (2, 5), 0, 64)}
    exec(block.replace("path/to/hf_checkpoint", str(checkpoint)), scope)
    assert scope["tokens"].shape == (2, 5 + 8)
    for peft_type in ("IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        assert (tmp_path / "out" / peft_type / "adapter_model.safetensors").is_file()


def test_multi_adapter_block_runs(checkpoint, tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "adapter_names=" in b)
    monkeypatch.chdir(tmp_path)
    scope = {"input_ids": jax.random.randint(jax.random.key(0), (3, 5), 0, 64)}
    exec(block.replace("path/to/hf_checkpoint", str(checkpoint)), scope)
    assert scope["logits"].shape == (3, 5, 64)
    assert sorted(scope["adapters"]) == ["chat", "default"]
    assert (tmp_path / "adapters" / "chat" / "adapter_model.safetensors").is_file()
    assert scope["combined"].config.r == 12


def test_qlora_block_runs(checkpoint, tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if 'quantize="nf4"' in b)
    monkeypatch.chdir(tmp_path)
    scope = {"input_ids": jax.random.randint(jax.random.key(0), (2, 5), 0, 64)}
    exec(block.replace("path/to/hf_checkpoint", str(checkpoint)), scope)
    assert scope["logits"].shape == (2, 5, 64)
    q_proj = scope["params"]["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    assert type(q_proj).__name__ == "QuantizedTensor" and q_proj.double_quant
    assert (tmp_path / "out" / "qlora" / "adapter_model.safetensors").is_file()


def test_sharding_block_runs_on_8_devices(checkpoint, tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "sharding.make_mesh" in b)
    monkeypatch.chdir(tmp_path)
    ids = jax.random.randint(jax.random.key(0), (4, 16), 0, 64)
    import jpeft

    scope = {
        "config": jpeft.LoraConfig(r=4, target_modules="all-linear"),
        "batches": [{"input_ids": ids, "labels": ids}] * 3,
    }
    exec(block.replace("path/to/hf_checkpoint", str(checkpoint)), scope)
    assert dict(scope["mesh"].shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert float(scope["loss"]) > 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
