"""Live training dashboards for `jpeft finetune --report-to`: TensorBoard and Weights & Biases.

The job's output folder is written whole at the end (`jpeft.finetune.outputs`), but a dashboard
must be live while the run trains, so every reporting run gets a folder of its own, made new and
never inside `--output-dir`: `<logging-dir>/<date-time>-<method>/` (`tensorboard --logdir runs`
shows them all). TensorBoard's event files are written there by TensorBoard's own writer (no
TensorFlow, no torch); the W&B run goes there too unless WANDB_DIR says otherwise.

Each dashboard is a small class with the same three methods (`Reporter`); `open_reporters` gives
the chosen ones as one and closes them however the run ends, a stopped or failed run with a
non-zero exit code.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from jpeft.finetune.options import JobError

Scalars = Mapping[str, float]


class Reporter(Protocol):
    """One dashboard of a run."""

    def log(self, step: int, scalars: Scalars) -> None:
        """Values at optimizer step `step` (0: before training)."""

    def summary(self, scalars: Scalars) -> None:
        """The run's one-off values: final scores, parameter counts, times."""

    def close(self, exit_code: int = 0) -> None:
        """Flush and finish; a non-zero `exit_code`: the run failed or was stopped."""


class TensorBoardReporter:
    """Event files in `folder`, written with TensorBoard's `EventFileWriter`: scalars as the
    `simple_value`s its scalar dashboard plots, the run config as the HParams dashboard's
    session-start record. Flushed every `FLUSH_SECONDS` while training, and on close."""

    FLUSH_SECONDS = 10

    def __init__(self, folder: Path, config: Mapping[str, Any], log):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.hparams import summary_v2 as hparams
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writer = EventFileWriter(str(folder), flush_secs=self.FLUSH_SECONDS)
        self._last_step = 0
        self._write(0, hparams.hparams_pb({name: _hparam(v) for name, v in config.items()}))
        log(f"tensorboard: event files in {folder} (tensorboard --logdir {folder.parent})")

    def log(self, step: int, scalars: Scalars) -> None:
        values = [self._summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
        self._write(step, self._summary(value=values))
        self._last_step = max(self._last_step, step)

    def summary(self, scalars: Scalars) -> None:
        """TensorBoard has no run-level values: scalars at the last step logged."""
        self.log(self._last_step, scalars)

    def close(self, exit_code: int = 0) -> None:
        self._writer.close()

    def _write(self, step: int, summary) -> None:
        self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))


def _hparam(value: Any) -> bool | int | float | str:
    """An option's value as the HParams dashboard takes it: lists and None as JSON text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


class WandbReporter:
    """A W&B run named after the folder, with the run config as its config. W&B's settings apply
    (WANDB_MODE, WANDB_PROJECT, WANDB_DIR, ...); where WANDB_MODE is unset and no API key is
    configured, the run is an offline one (`wandb sync` uploads it later), never a login prompt."""

    def __init__(self, folder: Path, config: Mapping[str, Any], log):
        self._run = _start_wandb_run(folder, config)
        if self._run.settings.mode == "offline":
            where = Path(self._run.dir).parent  # `dir` is the run's `files/` folder
            log(f"wandb: offline run in {where} (upload it with: wandb sync {where})")
        elif self._run.url:
            log(f"wandb: run {self._run.url}")

    def log(self, step: int, scalars: Scalars) -> None:
        self._run.log(dict(scalars), step=step)

    def summary(self, scalars: Scalars) -> None:
        self._run.summary.update(dict(scalars))

    def close(self, exit_code: int = 0) -> None:
        self._run.finish(exit_code=exit_code)


def _start_wandb_run(folder: Path, config: Mapping[str, Any]):
    """`wandb.init` for `WandbReporter`; JobError in one line where W&B refuses to start."""
    import wandb

    try:
        # W&B's own choice where WANDB_MODE is set or an API key is configured; else offline
        configured = os.environ.get("WANDB_MODE") or wandb.login(prompt=False, verify=False)
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "jpeft"),
            name=folder.name,
            dir=None if os.environ.get("WANDB_DIR") else str(folder),
            config=dict(config),
            mode=None if configured else "offline",
            reinit="create_new",  # a run of its own, even beside a caller's
        )
    # a malformed key, no network, a WANDB_* setting W&B refuses (pydantic's ValueError)
    except (wandb.errors.Error, ValueError) as err:
        problem = " ".join(str(err).split()) or repr(err)
        raise JobError(f"--report-to wandb: W&B could not start a run: {problem}") from None


DASHBOARDS = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}


class Reporters:
    """Several reporters as one; with none, reporting is off and every call does nothing."""

    def __init__(self) -> None:
        self._reporters: list[Reporter] = []

    def add(self, reporter: Reporter) -> None:
        self._reporters.append(reporter)

    def log(self, step: int, scalars: Scalars) -> None:
        for reporter in self._reporters:
            reporter.log(step, scalars)

    def summary(self, scalars: Scalars) -> None:
        for reporter in self._reporters:
            reporter.summary(scalars)

    def close(self, exit_code: int = 0) -> None:
        """Close them all, the last opened first, even when one of them fails to."""
        with contextlib.ExitStack() as closing:
            for reporter in self._reporters:
                closing.callback(reporter.close, exit_code)


@contextlib.contextmanager
def open_reporters(
    dashboards: list[str], folder: Path, config: Mapping[str, Any], log
) -> Iterator[Reporters]:
    """The `dashboards` ("tensorboard", "wandb") writing to `folder` (made new: see
    `new_folder`), closed when the block ends: with the exit code of a `RunStopped`, 1 for any
    other exception. No dashboards: a Reporters that does nothing, and no folder."""
    reporters = Reporters()
    if not dashboards:
        yield reporters
        return
    folder = new_folder(folder)
    try:
        for name in dashboards:
            reporters.add(DASHBOARDS[name](folder, config, log))
        yield reporters
    except BaseException as err:  # Ctrl-C and SIGTERM too: the logs so far are kept
        reporters.close(getattr(err, "exit_code", 1))
        raise
    reporters.close()


def new_folder(path: Path) -> Path:
    """`path`, made now; `path-2`, `path-3`, ... when it exists (a run never writes into
    another's folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for number in itertools.count(1):
        folder = path if number == 1 else path.with_name(f"{path.name}-{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def run_folder(logging_dir: str, method: str) -> Path:
    """Where this run's dashboards go: `<logging_dir>/<date-time>-<method>`."""
    return Path(logging_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}"


def check_logging_dir(logging_dir: str, output_dir: str) -> None:
    """JobError for a `--logging-dir` the dashboards cannot use: a file, or a folder in
    `--output-dir` (that folder is written whole at the end and holds only jpeft's outputs)."""
    path = Path(os.path.abspath(logging_dir))
    if path.is_file():
        raise JobError(f"--logging-dir {logging_dir} is a file; give a folder path")
    if path.resolve().is_relative_to(Path(os.path.abspath(output_dir)).resolve()):
        raise JobError(
            f"--logging-dir {logging_dir} is inside --output-dir {output_dir}, which is written "
            "whole when the run ends; give a folder outside it (default: runs)"
        )
