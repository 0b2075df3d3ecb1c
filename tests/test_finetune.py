"""`jpeft finetune`: the data pipeline, a tiny end-to-end run, and the CLI's error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
import torch
import transformers

from jpeft import cli
from jpeft.finetune import data as jdata

WORDS = "the a market shares bank profit film actor music award vote minister party election"
WORDS = WORDS.split()
TOPICS = ["money", "show", "state"]
TOPIC_WORDS = {"money": WORDS[2:6], "show": WORDS[6:10], "state": WORDS[10:14]}


def test_bbc_split_is_fixed_and_disjoint():
    dataset = jdata.bbc_news(test_size=400, seed=0)
    again = jdata.bbc_news(test_size=400, seed=0)
    assert len(dataset.test) == 400 and len(dataset.train) + 400 == 2125
    assert dataset.test == again.test
    assert not {e.text for e in dataset.test} & {e.text for e in dataset.train}
    assert set(dataset.labels) == {"business", "entertainment", "politics", "sport", "tech"}
    assert {e.answer for e in dataset.test} == set(dataset.labels)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer, saved as a HF directory."""
    path = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS, *TOPICS])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        initializer_range=0.3,  # a random base with signal in it, so a small LoRA learns fast
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def topic_csv(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for _ in range(150):
        topic = TOPICS[rng.integers(3)]
        words = rng.choice(TOPIC_WORDS[topic], 6).tolist() + rng.choice(WORDS[:2], 2).tolist()
        rows.append(f"{' '.join(rng.permutation(words))},{topic}")
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    path.write_text("\n".join(rows))
    return path


def test_finetune_end_to_end_learns(tiny_checkpoint, topic_csv, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_checkpoint), "--data", str(topic_csv)]
    args += ["--output-dir", str(out), "--steps", "60", "--batch-size", "8", "--seq-len", "48"]
    args += [
        "--test-size",
        "30",
        "--lr",
        "3e-2",
        "--r",
        "4",
        "--lora-alpha",
        "8",
        "--train-layers",
        "0",
    ]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "train_seconds", "tokens_per_second"):
        assert key in metrics
    assert (
        metrics["accuracy_after"] >= 0.9 and metrics["accuracy_after"] > metrics["accuracy_before"]
    )
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run.partial").exists()


OTHER_METHODS = {
    "ia3": ["--lr", "5e-2"],
    "prompt-tuning": ["--lr", "1e-1"],
    "p-tuning": ["--lr", "1e-2"],
    "prefix-tuning": ["--lr", "1e-1"],
}


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_finetune_other_methods_learn(tiny_checkpoint, topic_csv, tmp_path, method):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_checkpoint), "--data", str(topic_csv)]
    args += ["--output-dir", str(out), "--steps", "60", "--batch-size", "8", "--seq-len", "48"]
    args += ["--test-size", "30", "--method", method, "--train-layers", "0"]
    args += ["--virtual-tokens", "4", *OTHER_METHODS[method]]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    loss = np.asarray(metrics["loss"])
    assert loss[-10:].mean() < 0.8 * loss[:10].mean(), loss
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.upper().replace("-", "_")


def run_cli_error(args, capsys) -> str:
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_missing_model_file(tmp_path, capsys):
    out = tmp_path / "out"
    err = run_cli_error(
        ["finetune", "--model", str(tmp_path / "nope.gguf"), "--output-dir", str(out)], capsys
    )
    assert "nope.gguf" in err and not out.exists()


def test_unknown_method(tmp_path, capsys):
    err = run_cli_error(
        ["finetune", "--method", "superlora", "--output-dir", str(tmp_path / "o")], capsys
    )
    assert "superlora" in err and "lora" in err


def test_data_without_needed_columns(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,topic\nthe market,money\n")
    args = [
        "finetune",
        "--model",
        str(tiny_checkpoint),
        "--data",
        str(bad),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    err = run_cli_error(args, capsys)
    assert "bad.csv" in err and "'text' and 'label'" in err and not (tmp_path / "o").exists()


def test_sequence_length_the_model_cannot_take(tiny_checkpoint, topic_csv, tmp_path, capsys):
    args = ["finetune", "--model", str(tiny_checkpoint), "--data", str(topic_csv)]
    args += ["--seq-len", "4096", "--test-size", "30", "--output-dir", str(tmp_path / "o")]
    err = run_cli_error(args, capsys)
    assert "4096" in err and "64" in err and not (tmp_path / "o").exists()


def test_generate_with_and_without_adapter(tiny_checkpoint, topic_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_checkpoint), "--data", str(topic_csv), "--steps", "2"]
    assert cli.main(args + ["--seq-len", "48", "--test-size", "30", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    base = [
        "generate",
        "the market shares",
        "--model",
        str(tiny_checkpoint),
        "--max-new-tokens",
        "3",
    ]
    assert cli.main(base) == 0 and cli.main(base + ["--adapter", str(out / "adapter")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(set(line.split()) <= set(WORDS + TOPICS) for line in lines)


@pytest.mark.parametrize("command", ["finetune", "generate"])
def test_help_lists_the_options(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # argparse wraps help text to the terminal width
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out
    if command == "finetune":
        assert "prefix-tuning" in out and "top 40%" in out
