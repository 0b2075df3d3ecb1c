"""`jpeft finetune`: the data pipeline, a tiny end-to-end run, and the CLI's error paths."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from job_helpers import finalized_steps, job_args, run_cli_error, saved_adapter
from tiny_models import TOPIC_WORDS, TOPICS, WORDS

from jpeft import cli
from jpeft.finetune import data as jdata


def test_bbc_split_is_fixed_and_disjoint():
    dataset = jdata.bbc_news(test_size=400, seed=0)
    again = jdata.bbc_news(test_size=400, seed=0)
    assert len(dataset.test) == 400 and len(dataset.train) + 400 == 2125
    assert dataset.test == again.test
    assert not {e.text for e in dataset.test} & {e.text for e in dataset.train}
    assert set(dataset.labels) == {"business", "entertainment", "politics", "sport", "tech"}
    assert {e.answer for e in dataset.test} == set(dataset.labels)


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
    assert os.listdir(tmp_path) == ["run"]  # no temporary folder or lock file left


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


@pytest.mark.parametrize("base", ["float", pytest.param("nf4", marks=pytest.mark.slow)])
def test_sharded_job_gives_the_single_device_run(tiny_checkpoint, topic_csv, tmp_path, base):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    quantize = [] if base == "float" else ["--quantize", base]
    assert cli.main(job_args(tiny_checkpoint, topic_csv, single, "--steps", 8, *quantize)) == 0
    mesh = ["--mesh", "data=2,fsdp=2,model=2", "--remat", "full", *quantize]
    assert cli.main(job_args(tiny_checkpoint, topic_csv, sharded, "--steps", 8, *mesh)) == 0
    expected = json.loads((single / "metrics.json").read_text())
    got = json.loads((sharded / "metrics.json").read_text())
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-4)
    assert got["config"]["mesh"] == "data=2,fsdp=2,model=2"
    for name, value in saved_adapter(single).items():
        np.testing.assert_allclose(saved_adapter(sharded)[name], value, rtol=1e-4, atol=1e-6)


def test_mesh_and_batch_mistakes_are_one_line_errors(tiny_checkpoint, topic_csv, tmp_path, capsys):
    out = tmp_path / "o"
    err = run_cli_error(job_args(tiny_checkpoint, topic_csv, out, "--mesh", "data=3"), capsys)
    assert "--mesh" in err and "8 devices" in err
    args = job_args(tiny_checkpoint, topic_csv, out, "--mesh", "fsdp=8", "--batch-size", "12")
    err = run_cli_error(args, capsys)
    assert "--batch-size 12" in err and "multiple of 8" in err and not out.exists()


def test_config_file_options_and_flags_over_them(tiny_checkpoint, topic_csv, tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {"steps": 3, "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
        )  # --r 4 given
    )
    out = tmp_path / "run"
    args = job_args(tiny_checkpoint, topic_csv, out, "--config", config, "--lora-alpha", 16)
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and len(metrics["loss"]) == 3
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 16 and saved["target_modules"] == ["q_proj"]
    capsys.readouterr()
    config.write_text(json.dumps({"stepz": 3}))
    err = run_cli_error(job_args(tiny_checkpoint, topic_csv, out, "--config", config), capsys)
    assert "run.json" in err and "stepz" in err


def test_free_text_answers_are_scored_by_held_out_loss(tiny_checkpoint, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(60):
        topic = TOPICS[rng.integers(3)]
        prompt = " ".join(rng.choice(TOPIC_WORDS[topic], 5))
        lines.append(json.dumps({"prompt": prompt, "completion": f"{topic} {topic}"}))
    data.write_text("\n".join(lines))
    out = tmp_path / "run"
    assert cli.main(job_args(tiny_checkpoint, data, out, "--steps", 30)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_answer_loss_after"] < 0.5 * metrics["test_answer_loss_before"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_checkpoint, topic_csv, tmp_path):
    """SIGKILL a checkpointing run mid-way, run the same command again: it resumes from the last
    finished checkpoint and ends with exactly the adapter of a run that was never stopped."""
    steps = 300
    command = [sys.executable, "-m", "jpeft.cli"]
    full = tmp_path / "full"
    uninterrupted = job_args(tiny_checkpoint, topic_csv, full, "--steps", steps)
    subprocess.run(command + uninterrupted, check=True, capture_output=True)

    checkpoints, out = tmp_path / "checkpoints", tmp_path / "resumed"
    resumable = job_args(tiny_checkpoint, topic_csv, out, "--steps", steps)
    resumable += ["--checkpoint-dir", str(checkpoints), "--checkpoint-every", "10"]
    process = subprocess.Popen(
        command + resumable, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not [s for s in finalized_steps(checkpoints) if s >= 30]:
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_after = max(finalized_steps(checkpoints))
    assert 30 <= killed_after < steps and not out.exists()

    resumed = subprocess.run(command + resumable, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint after step" in resumed.stdout
    expected, got = saved_adapter(full), saved_adapter(out)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    losses = json.loads((out / "metrics.json").read_text())["loss"]
    assert losses == json.loads((full / "metrics.json").read_text())["loss"]


@pytest.mark.slow
def test_two_process_job_gives_the_single_device_run(tiny_checkpoint, topic_csv, tmp_path):
    """`jpeft finetune --distributed` in two processes of 4 CPU devices each, started through the
    JAX_* environment variables, trains on one 8-device mesh; process 0 writes the result."""
    single, pair = tmp_path / "single", tmp_path / "pair"
    assert cli.main(job_args(tiny_checkpoint, topic_csv, single, "--steps", 6)) == 0
    args = job_args(tiny_checkpoint, topic_csv, pair, "--steps", 6, "--distributed")
    args += ["--mesh", "data=2,fsdp=2,model=2"]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = []
    for process_id in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
        env |= {
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(process_id),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "jpeft.cli", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=600)[0] for p in processes]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-3000:]
    expected = json.loads((single / "metrics.json").read_text())
    got = json.loads((pair / "metrics.json").read_text())
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-4)
    assert got["accuracy_after"] == expected["accuracy_after"]
    for name, value in saved_adapter(single).items():
        np.testing.assert_allclose(saved_adapter(pair)[name], value, rtol=1e-4, atol=1e-6)
