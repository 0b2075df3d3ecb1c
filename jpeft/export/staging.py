"""Writing an export whole or not at all: into a hidden sibling first, renamed into place.

An export never replaces what exists: the destination must be new. A failure or Ctrl-C while
writing removes the partial output, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def check_new(path: str | os.PathLike, what: str) -> Path:
    """`path` as an absolute Path; ValueError when something exists there or its parent is not a
    writable folder (`what` names the option, e.g. "--out")."""
    out = Path(os.path.abspath(path))
    if out.exists() or out.is_symlink():
        raise ValueError(
            f"{what} {path} already exists; exports never replace files: give a new path "
            "or remove it first"
        )
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: no permission to write in {parent}")
    return out


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path` by one rename."""
    with _staged(path, what, _new_dir, lambda p: shutil.rmtree(p, ignore_errors=True)) as partial:
        yield partial


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, what: str = "output file") -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it becomes `path` by one rename."""
    with _staged(path, what, _new_file, lambda p: p.unlink(missing_ok=True)) as partial:
        yield partial


@contextlib.contextmanager
def _staged(
    path: str | os.PathLike, what: str, make: Callable[[Path], Path], remove: Callable[[Path], Any]
) -> Iterator[Path]:
    """`make(out)` a hidden sibling of the new `path`, yield it, rename it to `path`; on any
    failure (Ctrl-C too) `remove` it."""
    out = check_new(path, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = make(out)
    try:
        yield partial
        if out.exists():  # appeared while writing: still never replace it
            raise ValueError(f"{path} appeared while exporting; the export was not written")
        os.rename(partial, out)
    except BaseException:
        remove(partial)
        raise


def _new_dir(out: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _new_file(out: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(handle)
    return Path(name)
