"""`jpeft finetune` never loses a file, a run or a night: faults and bad input, one class each.

Output folders jpeft did not write are never touched; one run per folder (locks); a checkpoint
resumes only the run that wrote it; a NaN/inf step stops the run keeping the last good state;
every option is checked before work starts; Ctrl-C and SIGTERM end a run cleanly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from job_helpers import finalized_steps, job_args, run_cli_error, saved_adapter

import jpeft
from jpeft import cli
from jpeft.finetune.lock import FolderLock, LockedError
from jpeft.finetune.outputs import MARKER
from jpeft.train import causal_lm_objective, make_train_step

# ---------------------------------------------------------------------------------------------
# the output folder


def test_a_folder_jpeft_did_not_write_is_never_touched(
    tiny_checkpoint, topic_csv, tmp_path, capsys, monkeypatch
):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    err = run_cli_error(job_args(tiny_checkpoint, topic_csv, mine, "--overwrite"), capsys)
    assert "not written by jpeft" in err
    assert os.listdir(mine) == ["chapter1.tex"] and (mine / "chapter1.tex").read_text()

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for folder in (".", "..", str(tmp_path), "/"):
        err = run_cli_error(job_args(tiny_checkpoint, topic_csv, folder, "--overwrite"), capsys)
        assert "working folder or one above it" in err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    err = run_cli_error(job_args(tiny_checkpoint, topic_csv, a_file), capsys)
    assert "is a file" in err and a_file.read_text() == "x"


def test_a_previous_output_is_replaced_only_with_overwrite_and_only_if_all_jpeft(
    tiny_checkpoint, topic_csv, tmp_path, capsys
):
    out = tmp_path / "run"
    assert cli.main(job_args(tiny_checkpoint, topic_csv, out, "--steps", 1)) == 0
    capsys.readouterr()
    listed = json.loads((out / MARKER).read_text())["files"]
    assert sorted(listed) == [
        "adapter/README.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "loss.png",
        "metrics.json",
    ]
    err = run_cli_error(job_args(tiny_checkpoint, topic_csv, out, "--steps", 2), capsys)
    assert "--overwrite" in err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1

    assert cli.main(job_args(tiny_checkpoint, topic_csv, out, "--steps", 2, "--overwrite")) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no temporary folder, no lock left

    (out / "adapter" / "my_notes.md").write_text("mine")
    err = run_cli_error(job_args(tiny_checkpoint, topic_csv, out, "--overwrite"), capsys)
    assert "adapter/my_notes.md" in err and (out / "adapter" / "my_notes.md").exists()


def test_outputs_get_the_permissions_of_any_new_file(tiny_checkpoint, topic_csv, tmp_path):
    out = tmp_path / "run"
    umask = os.umask(0o022)
    try:
        assert cli.main(job_args(tiny_checkpoint, topic_csv, out, "--steps", 1)) == 0
    finally:
        os.umask(umask)
    for path in [out, *out.rglob("*")]:
        expected = 0o755 if path.is_dir() else 0o644
        assert path.stat().st_mode & 0o777 == expected, path


# ---------------------------------------------------------------------------------------------
# one run per folder


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(
    tiny_checkpoint, topic_csv, tmp_path, capsys
):
    out = tmp_path / "run"
    with FolderLock(out, "--output-dir"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            FolderLock(out, "--checkpoint-dir").acquire()
        err = run_cli_error(job_args(tiny_checkpoint, topic_csv, out), capsys)
        assert "in use by another jpeft run" in err and f"{out}.lock" in err
    assert not Path(f"{out}.lock").exists()

    gone = subprocess.Popen(["true"])
    gone.wait()  # a finished process: its lock is stale
    owner = {"pid": gone.pid, "host": socket.gethostname(), "started": 0}
    Path(f"{out}.lock").write_text(json.dumps(owner))
    assert cli.main(job_args(tiny_checkpoint, topic_csv, out, "--steps", 1)) == 0
    assert "removing the stale lock" in capsys.readouterr().out
    assert not Path(f"{out}.lock").exists() and (out / MARKER).is_file()


# ---------------------------------------------------------------------------------------------
# checkpoints belong to one run


def test_a_checkpoint_resumes_only_the_run_that_wrote_it(
    tiny_checkpoint, topic_csv, tmp_path, capsys
):
    checkpoints = tmp_path / "checkpoints"
    resumable = ("--steps", 4, "--checkpoint-dir", checkpoints, "--checkpoint-every", 2)
    first = tmp_path / "first"
    assert cli.main(job_args(tiny_checkpoint, topic_csv, first, *resumable)) == 0
    capsys.readouterr()
    other_data = tmp_path / "other.csv"
    other_data.write_text(topic_csv.read_text().replace("market", "bank"))
    for change, named in (
        (("--lr", "1e-2"), "--lr: 0.03 there, 0.01 now"),
        (("--steps", "6"), "--steps: 4 there, 6 now"),
        (("--seed", "1"), "--seed: 0 there, 1 now"),
        (("--method", "ia3"), "--method: 'lora' there, 'ia3' now"),
    ):
        args = job_args(tiny_checkpoint, topic_csv, tmp_path / "o", *resumable, *change)
        err = run_cli_error(args, capsys)
        assert named in err and "belong to another run" in err
    err = run_cli_error(job_args(tiny_checkpoint, other_data, tmp_path / "o", *resumable), capsys)
    assert "--data (training examples)" in err

    # the same run again: reported as finished, its own result written again
    again = tmp_path / "again"
    capsys.readouterr()
    assert cli.main(job_args(tiny_checkpoint, topic_csv, again, *resumable)) == 0
    log = capsys.readouterr().out
    assert "after step 4 in" in log and "the run had finished" in log
    for name, value in saved_adapter(first).items():
        np.testing.assert_array_equal(saved_adapter(again)[name], value)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_text("x")
    args = job_args(tiny_checkpoint, topic_csv, tmp_path / "o", "--checkpoint-dir", foreign)
    assert "holds files and no run_identity.json" in run_cli_error(args, capsys)
    args = job_args(tiny_checkpoint, topic_csv, tmp_path / "o", "--checkpoint-dir", other_data)
    assert "is a file" in run_cli_error(args, capsys)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# numbers that cannot be trusted


def test_a_nonfinite_step_changes_nothing_and_returns_nan(tiny_checkpoint):
    model, params = jpeft.models.from_pretrained(tiny_checkpoint)
    adapter = jpeft.init_adapter(
        params, jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), key=jax.random.key(0)
    )
    adapter = jax.tree.map(lambda x: x + 0.1, adapter)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(jpeft.partition(adapter)[0])
    ids = jnp.ones((2, 8), jnp.int32)
    batch = {"input_ids": ids, "labels": ids}

    def poisoned(*args):
        return causal_lm_objective(*args) * jnp.where(args[3]["labels"][0, 0] > 0, jnp.inf, 1.0)

    step = make_train_step(model, optimizer, poisoned)
    before = jax.tree.map(np.asarray, (adapter, opt_state))
    adapter, opt_state, loss = step(params, adapter, opt_state, batch)
    assert math.isnan(float(loss))
    for got, want in zip(
        jax.tree.leaves((adapter, opt_state)), jax.tree.leaves(before), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    adapter, opt_state, loss = step(params, adapter, opt_state, batch | {"labels": ids * 0})
    assert math.isfinite(float(loss))
    assert not np.array_equal(jax.tree.leaves(adapter)[0], jax.tree.leaves(before)[0])


def test_a_diverging_run_stops_keeping_the_last_good_checkpoint(
    tiny_checkpoint, topic_csv, tmp_path, capsys
):
    out, checkpoints = tmp_path / "run", tmp_path / "checkpoints"
    args = job_args(tiny_checkpoint, topic_csv, out, "--steps", 30, "--lr", "1e30")
    args += ["--warmup-steps", "0", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "1"]
    assert cli.main(args) == 1
    err = last_line(capsys.readouterr().err)
    assert "not finite" in err and "without writing" in err and "Traceback" not in err
    bad_step = int(err.split("step ")[1].split(":")[0])
    last = max(finalized_steps(checkpoints))
    assert last == bad_step - 1 and f"checkpoint after step {last}" in err
    assert not out.exists() and not Path(f"{out}.lock").exists()


# ---------------------------------------------------------------------------------------------
# every option checked before work starts

BAD_OPTIONS = [
    (("--steps", "0"), "--steps 0: must be an integer >= 1"),
    (("--batch-size", "-2"), "--batch-size -2"),
    (("--eval-batch-size", "0"), "--eval-batch-size 0"),
    (("--text-tokens", "0"), "--text-tokens 0"),
    (("--seq-len", "1"), "--seq-len 1"),
    (("--warmup-steps", "-1"), "--warmup-steps -1: must be an integer >= 0"),
    (("--r", "0"), "--r 0"),
    (("--virtual-tokens", "0"), "--virtual-tokens 0"),
    (("--checkpoint-every", "0"), "--checkpoint-every 0"),
    (("--seed", "-1"), "--seed -1"),
    (("--lr", "0"), "--lr 0.0: the learning rate must be > 0"),
    (("--lora-alpha", "inf"), "--lora-alpha inf: must be a finite number"),
    (("--lr", "nan"), "--lr nan"),
    (("--lr=-1e-3",), "--lr -0.001"),
    (("--lora-dropout", "1.5"), "--lora-dropout 1.5: must be in [0, 1)"),
    (("--target-modules", "q_proj("), "--target-modules 'q_proj(' is not a valid regex"),
    (("--quantize", "int8"), "--quantize 'int8': choose one of nf4, fp4"),
    (("--remat", "half"), "--remat 'half'"),
    (("--method", "superlora"), "--method 'superlora' is not available"),
]
BAD_CONFIG_FILES = [
    ({"steps": "80"}, "steps = '80' must be an integer, not a string"),
    ({"lr": True}, "lr = True must be a finite number or null, not a boolean"),
    ({"lr": float("nan")}, "lr = nan must be a finite number or null"),
    ({"r": 4.0}, "r = 4.0 must be an integer, not a float"),
    ({"target_modules": [1]}, "target_modules = [1] must be a string, a list of strings or null"),
    ({"overwrite": "yes"}, "overwrite = 'yes' must be true or false"),
]


@pytest.mark.parametrize(
    ("flags", "message"), BAD_OPTIONS, ids=["=".join(f[0]) for f in BAD_OPTIONS]
)
def test_bad_options_are_one_line_errors_before_any_work(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    err = run_cli_error(
        ["finetune", "--output-dir", str(out), "--model", "/nowhere", *flags], capsys
    )
    assert message in err and not out.exists()


@pytest.mark.parametrize(
    ("values", "message"), BAD_CONFIG_FILES, ids=[next(iter(v[0])) for v in BAD_CONFIG_FILES]
)
def test_config_file_values_of_the_wrong_type(values, message, tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(values))
    err = run_cli_error(["finetune", "--config", str(config)], capsys)
    assert "run.json" in err and message in err


def test_generate_checks_its_options(tiny_checkpoint, capsys):
    args = ["generate", "hi", "--model", str(tiny_checkpoint), "--max-new-tokens", "0"]
    assert "--max-new-tokens 0: must be an integer >= 1" in run_cli_error(args, capsys)


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM


def start_job(args: list[str]) -> subprocess.Popen:
    """The `jpeft` command (its entry point, `jpeft_launcher.main`) as a user runs it in a
    terminal: with Ctrl-C handled, which it is not in background jobs (this test may be one)."""
    process = subprocess.Popen(
        [sys.executable, "-c", TERMINAL_LAUNCH, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr.readline() == "started\n"  # Ctrl-C is handled from here on
    return process


TERMINAL_LAUNCH = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "print('started', file=sys.stderr, flush=True); "
    "sys.argv[0] = 'jpeft'; from jpeft_launcher import main; sys.exit(main())"
)


def wait_for_checkpoint(process: subprocess.Popen, checkpoints: Path, least: int) -> None:
    deadline = time.monotonic() + 300
    while not [s for s in finalized_steps(checkpoints) if s >= least]:
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.02)


def last_line(err: str) -> str:
    """The last line of stderr without the progress bar's carriage-return updates."""
    return err.strip().splitlines()[-1].split("\r")[-1]


# SIGTERM takes the same path as Ctrl-C but for its exit code: in the slow set.
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]
)
def test_signals_during_training_stop_cleanly(signum, tiny_checkpoint, topic_csv, tmp_path):
    out, checkpoints = tmp_path / "run", tmp_path / "checkpoints"
    args = job_args(tiny_checkpoint, topic_csv, out, "--steps", 100000)
    process = start_job(args + ["--checkpoint-dir", str(checkpoints), "--checkpoint-every", "5"])
    wait_for_checkpoint(process, checkpoints, 5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert "Traceback" not in err, err[-3000:]
    assert process.returncode == (130 if signum == signal.SIGINT else 143)
    line = last_line(err)
    stopped_after = int(line.split("after step ")[1].split(";")[0])
    assert max(finalized_steps(checkpoints)) == stopped_after  # the state at the stop is saved
    assert f"the checkpoint after step {max(finalized_steps(checkpoints))} is kept" in line
    assert not out.exists() and not Path(f"{out}.lock").exists()
    assert not Path(f"{checkpoints}.lock").exists()


@pytest.mark.parametrize("moment", ["importing", "loading", "evaluating"])
def test_ctrl_c_while_starting_or_compiling_exits_cleanly(
    moment, tiny_checkpoint, topic_csv, tmp_path
):
    """Ctrl-C while JAX is imported, the model loaded or the first evaluation compiled: one
    line, exit code 130, nothing written (a KeyboardInterrupt raised inside jaxlib's start-up
    crashes it, and one raised in JAX's C++ callbacks is swallowed: both must be handled)."""
    out = tmp_path / "run"
    process = start_job(job_args(tiny_checkpoint, topic_csv, out, "--steps", 100000))
    wait_for = {"importing": None, "loading": "loading", "evaluating": "Adapter("}[moment]
    while wait_for is not None and not process.stdout.readline().startswith(wait_for):
        assert process.poll() is None
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Exception" not in err, err[-3000:]
    assert "interrupted (Ctrl-C)" in last_line(err)
    assert not out.exists() and not Path(f"{out}.lock").exists()
