"""One run per folder: a lock file beside the folder, naming the process that holds it.

`<folder>.lock` holds the owner's pid, host and start time as JSON. It is created atomically and
exclusively (written under a temporary name, then hard-linked to its name, which fails when the
name exists), so two runs starting together cannot both get it. A lock whose owner is gone (same
host, no such process) is stale: it is taken over, with a message. A lock from another host
cannot be checked from here; the error says which file to delete if that run is gone. Remote
folders (`gs://...`) are not locked.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


class LockedError(ValueError):
    """The folder is in use by another run."""


class FolderLock:
    """Context manager holding `<folder>.lock` for `purpose` (e.g. "--output-dir")."""

    def __init__(self, folder: str | os.PathLike, purpose: str, log=print):
        self.folder = os.path.abspath(folder)
        self.path = Path(f"{self.folder}.lock")
        self.purpose = purpose
        self.log = log
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self._held = False

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, taking over a stale one once; LockedError if a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._try_create():
            return
        holder = self._holder()
        if holder is not None and not _is_gone(holder):
            raise LockedError(
                f"{self.purpose} {self.folder} is in use by another jpeft run "
                f"(pid {holder['pid']} on {holder['host']}, see {self.path}); wait for it to end, "
                "use another folder, or delete the lock file if that run is gone"
            )
        self.log(f"removing the stale lock {self.path} of a run that is gone ({holder})")
        self.path.unlink(missing_ok=True)
        if not self._try_create():
            raise LockedError(f"{self.path} was taken by another run just now; try again")

    def release(self) -> None:
        """Remove the lock file if this object holds it."""
        if self._held and self._holder() == self.owner:
            self.path.unlink(missing_ok=True)
        self._held = False

    def _try_create(self) -> bool:
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.owner))
        try:
            os.link(temporary, self.path)
        except FileExistsError:
            return False
        finally:
            temporary.unlink()
        self._held = True
        return True

    def _holder(self) -> dict | None:
        """The lock file's owner, or None when it is unreadable (treated as stale)."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and {"pid", "host"} <= set(holder) else None


def _is_gone(holder: dict) -> bool:
    """True when `holder` ran on this host and its process no longer exists."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False
