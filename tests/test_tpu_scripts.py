"""tpu/: the launch script's commands (dry run, no gcloud needed) and the run configs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from jpeft.cli import config_file_options
from jpeft.finetune.options import FinetuneConfig

TPU = Path(__file__).resolve().parents[1] / "tpu"
CONFIGS = sorted((TPU / "configs").glob("*.json"))


def dry_run(accelerator: str) -> str:
    args = ["bash", str(TPU / "launch.sh"), "--dry-run", "--name", "t", "--zone", "z"]
    args += ["--accelerator-type", accelerator, "--config", str(CONFIGS[0])]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return done.stdout


@pytest.mark.parametrize(
    "accelerator, devices", [("v4-8", 4), ("v4-32", 16), ("v5litepod-16", 16), ("v5p-8", 4)]
)
def test_launch_runs_one_command_on_every_worker_with_fsdp_over_the_slice(accelerator, devices):
    out = dry_run(accelerator)
    train = [line for line in out.splitlines() if "jpeft finetune" in line]
    assert len(train) == 1 and "--worker=all" in train[0] and "--distributed" in train[0]
    assert f"--mesh data=1,fsdp={devices},model=1" in train[0]
    assert f"--accelerator-type={accelerator}" in out


def test_unknown_accelerator_is_refused():
    with pytest.raises(subprocess.CalledProcessError) as failure:
        dry_run("tpu9-8")
    assert "unsupported accelerator type" in failure.value.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_are_finetune_options(path):
    options = config_file_options(str(path))
    config = FinetuneConfig(**options)
    assert config.method == "lora" and config.batch_size % 8 == 0
