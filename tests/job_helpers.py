"""Helpers of the `jpeft finetune` tests: a short run's arguments, its outputs, its errors."""

from __future__ import annotations

import numpy as np

from jpeft import cli


def job_args(tiny_checkpoint, data, out, *extra) -> list[str]:
    """A short tiny-model run of `jpeft finetune` writing to `out`."""
    args = ["finetune", "--model", str(tiny_checkpoint), "--data", str(data)]
    args += ["--output-dir", str(out), "--seq-len", "48", "--test-size", "8"]
    args += ["--eval-batch-size", "8", "--r", "4", "--train-layers", "0", "--lr", "3e-2"]
    return args + [str(a) for a in extra]


def run_cli_error(args, capsys) -> str:
    """The one-line error of a command that must fail with exit code 2."""
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def saved_adapter(out) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def finalized_steps(directory) -> list[int]:
    """Steps orbax has finished writing (a save in progress has a temporary name)."""
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
