"""The job's output folder: checked before any work, written whole or not at all.

jpeft never deletes what it did not write. A finished run leaves a marker file listing every file
it wrote; an existing `--output-dir` is used only when it is empty, or when it holds exactly a
finished jpeft run's files and `--overwrite` is given. The outputs are written to a temporary
folder beside it and moved into place by renames, so a failed or killed run leaves the previous
result (or nothing), never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jpeft
from jpeft.finetune.options import JobError

MARKER = "jpeft-run.json"  # what a finished run wrote, and when


def check_output_dir(output_dir: str, overwrite: bool) -> Path:
    """The absolute output folder, or JobError when writing there could destroy anything or is
    bound to fail: the working folder or one above it, a file, a folder jpeft did not write (or
    holding files it did not write), a previous run's output without `overwrite`, no write
    permission."""
    path = Path(os.path.abspath(output_dir))
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise JobError(
            f"--output-dir {output_dir} is the working folder or one above it; jpeft writes its "
            "outputs into a folder of their own: give a new folder name such as jpeft-output"
        )
    if path.exists() and not path.is_dir():
        raise JobError(f"--output-dir {output_dir} is a file; give a folder path")
    if path.is_dir() and any(path.iterdir()):
        foreign = files_not_written_by_jpeft(path)
        if foreign is None:
            raise JobError(
                f"--output-dir {output_dir} exists and was not written by jpeft; jpeft never "
                "replaces a folder it did not write: give a new or empty folder"
            )
        if foreign:
            raise JobError(
                f"--output-dir {output_dir} holds a jpeft run plus files jpeft did not write "
                f"({', '.join(foreign[:5])}); move them out or give another folder"
            )
        if not overwrite:
            raise JobError(
                f"--output-dir {output_dir} holds a finished jpeft run; pass --overwrite to "
                "replace it, or give another folder"
            )
    parent = next(p for p in path.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JobError(f"--output-dir {output_dir}: no permission to write in {parent}")
    return path


def files_not_written_by_jpeft(folder: Path) -> list[str] | None:
    """The files in `folder` its marker does not list; None when it has no readable marker."""
    try:
        listed = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    present = [str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()]
    return sorted(set(present) - set(listed) - {MARKER})


def write_outputs(output_dir: Path, adapter, metrics: dict[str, Any]) -> None:
    """metrics.json, loss.png, adapter/ (PEFT format, with its model card) and the marker into
    `output_dir`, whole.

    A folder that appeared meanwhile and is not a jpeft run is left alone: the outputs are
    then kept in their temporary folder and the error says where.
    """
    partial = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=_made(output_dir.parent)))
    try:
        jpeft.save_pretrained(adapter, partial / "adapter", metrics=card_metrics(metrics))
        plot_loss(metrics["loss"], partial / "loss.png")
        (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))
        files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if not p.is_dir())
        marker = {"written_by": "jpeft finetune", "finished": time.time(), "files": files}
        (partial / MARKER).write_text(json.dumps(marker, indent=2))
        _make_readable(partial)
    except BaseException:  # Ctrl-C included: no half-written folder stays behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    changed = output_dir.exists() and any(output_dir.iterdir())
    if changed and files_not_written_by_jpeft(output_dir) != []:
        raise JobError(
            f"--output-dir {output_dir} was filled by something else during the run; "
            f"the outputs are in {partial}"
        )
    previous = None
    if output_dir.exists():
        previous = partial.with_name(partial.name + ".previous")
        output_dir.rename(previous)
    partial.rename(output_dir)
    if previous is not None:
        shutil.rmtree(previous)


def card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the adapter's model card shows of a run: the scores before and after training, and
    how long and how it trained."""
    config = metrics["config"]
    scores = {k: v for k, v in metrics.items() if k.endswith(("_before", "_after"))}
    return scores | {
        "steps": metrics["steps"],
        "batch_size": config["batch_size"],
        "lr": config["lr"],
        "train_examples": metrics["train_examples"],
        "train_seconds": metrics["train_seconds"],
    }


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _make_readable(folder: Path) -> None:
    """Give `folder` (mkdtemp makes it 0700) the mode any folder the user makes gets."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def plot_loss(losses: list[float], path: Path) -> None:
    """The training loss per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token loss")
    ax.set_title("jpeft finetune")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
