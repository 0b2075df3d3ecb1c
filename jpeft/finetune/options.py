"""The options of `jpeft finetune` and their checks, all made before any work starts.

Each check names the flag, the value given and what is allowed, in one line: a run that would
fail after an hour of loading and compiling, or train on a meaningless setting, fails now.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from typing import Any

from jpeft.json_types import describe, fits, kind
from jpeft.method import registered

QUANTIZE_CHOICES = ("nf4", "fp4")
REMAT_CHOICES = ("dots", "full", "none")
REPORT_CHOICES = ("tensorboard", "wandb", "none")  # `--report-to`, as HF Trainer's `report_to`


class JobError(ValueError):
    """A user mistake in the job's options, reported in one line."""


@dataclasses.dataclass
class FinetuneConfig:
    """Options of `jpeft finetune`; the defaults are the main job."""

    model: str | None = None
    data: str | None = None
    output_dir: str = "jpeft-output"
    overwrite: bool = False  # replace a previous jpeft output in output_dir
    method: str = "lora"
    quantize: str | None = None  # "nf4" / "fp4": a 4-bit base (QLoRA), double-quantized
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None  # None: the method's default
    train_layers: int | None = None  # None: the top 40% of the layers
    virtual_tokens: int = 20
    steps: int = 80
    batch_size: int = 8
    seq_len: int = 128
    text_tokens: int = 64
    lr: float | None = None  # None: the method's default (`default_lr` of its registry entry)
    warmup_steps: int = 10
    test_size: int = 300
    eval_batch_size: int = 16
    seed: int = 0
    skip_bad_rows: bool = False  # drop malformed data rows (and report how many) instead of failing
    mesh: str | None = None  # "data=D,fsdp=F,model=M" (one may be -1); None: one device
    distributed: bool = False  # jax.distributed.initialize() first (TPU pods: every host)
    checkpoint_dir: str | None = None  # orbax train-state checkpoints; a rerun resumes
    checkpoint_every: int = 50
    remat: str | None = None  # per-layer activation checkpointing: "dots", "full" or "none"
    report_to: str | list[str] = "none"  # "tensorboard", "wandb", both (comma-separated), "none"
    logging_dir: str = "runs"  # the dashboards' logs: a new <logging_dir>/<date-time>-<method>/


def flag(name: str) -> str:
    """The command-line flag of an option: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


# The least value of each integer option (None options may also be None).
AT_LEAST = {
    "r": 1,
    "train_layers": 0,
    "virtual_tokens": 1,
    "steps": 1,
    "batch_size": 1,
    "seq_len": 2,
    "text_tokens": 1,
    "warmup_steps": 0,
    "test_size": 1,
    "eval_batch_size": 1,
    "seed": 0,
    "checkpoint_every": 1,
}


def check_types(values: dict[str, Any], source: str | None = None) -> None:
    """JobError when a value's type does not fit its option: `"steps": "80"` or `"lr": true` in
    a `--config` file (`source`: its flag and path), or a value set in Python (named by flag)."""
    hints = typing.get_type_hints(FinetuneConfig)
    for name, value in values.items():
        if not fits(value, hints[name]):
            given = f"{source}: {name} = {value!r}" if source else f"{flag(name)} {value!r}:"
            raise JobError(f"{given} must be {describe(hints[name])}, not {kind(value)}")


def validate(config: FinetuneConfig) -> None:
    """JobError naming the flag for a value no run can use: types first (numbers finite,
    true/false never a number), then ranges and choices."""
    check_types(dataclasses.asdict(config))
    for name, least in AT_LEAST.items():
        value = getattr(config, name)
        if value is not None and value < least:
            raise JobError(f"{flag(name)} {value}: must be an integer >= {least}")
    if config.method not in registered():
        raise JobError(
            f"--method {config.method!r} is not available; choose from {list(registered())}"
        )
    for name, choices in (("quantize", QUANTIZE_CHOICES), ("remat", REMAT_CHOICES)):
        value = getattr(config, name)
        if value is not None and value not in choices:
            raise JobError(f"{flag(name)} {value!r}: choose one of {', '.join(choices)}")
    if config.lr is not None and config.lr <= 0:  # (NaN and inf fail the type check)
        raise JobError(f"--lr {config.lr}: the learning rate must be > 0")
    if not 0 <= config.lora_dropout < 1:
        raise JobError(f"--lora-dropout {config.lora_dropout}: must be in [0, 1)")
    for name in ("output_dir", "model", "data", "checkpoint_dir", "mesh", "logging_dir"):
        if getattr(config, name) == "":
            raise JobError(f"{flag(name)} is empty; give a path or leave the option out")
    _check_targets(config.target_modules)
    report_targets(config.report_to)


def report_targets(report_to: str | list[str]) -> list[str]:
    """The dashboards `--report-to` names, without "none"; JobError for an unknown name, "none"
    beside others, or a dashboard whose package is not installed."""
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [name.strip() for name in names]
    for name in names:
        if name not in REPORT_CHOICES:
            raise JobError(
                f"--report-to {name!r}: choose from {', '.join(REPORT_CHOICES)} (several "
                "comma-separated)"
            )
    if "none" in names and len(names) > 1:
        raise JobError(f"--report-to {','.join(names)}: 'none' cannot go with other dashboards")
    targets = [name for name in dict.fromkeys(names) if name != "none"]
    for name in targets:
        if importlib.util.find_spec(name) is None:
            raise JobError(
                f"--report-to {name} needs the {name} package: pip install 'jpeft[{name}]'"
            )
    return targets


def _check_targets(targets: str | list[str] | None) -> None:
    """A regex must compile; a list must hold module names."""
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as err:
            raise JobError(f"--target-modules {targets!r} is not a valid regex: {err}") from None
    if isinstance(targets, list) and not all(targets):
        raise JobError(f"--target-modules {targets!r}: a module name is empty")
