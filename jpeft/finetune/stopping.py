"""How a run stops early: Ctrl-C, SIGTERM, or numbers that cannot be trusted.

Every early stop is a `RunStopped` carrying the exit code and a one-line message saying what was
kept (the last checkpoint) and what to do. Outside the train loop Ctrl-C raises
KeyboardInterrupt and SIGTERM (a scheduler's, a preempted VM's) raises `Terminated`, so the
command exits at once with nothing written. Inside the loop both are noted and acted on after the
current step, so a consistent state can be checkpointed first (orbax's background saves are
never cut halfway); a second Ctrl-C there stops at once.

A signal is always noted too: raised while Python runs a callback it cannot propagate from (JAX's
garbage-collection callback, say), the exception is swallowed (and not printed: that would be a
traceback for a Ctrl-C), and `check()` at the next phase raises it again.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
STOP_NAMES = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "terminated (SIGTERM)"}


class RunStopped(Exception):
    """The run ended before finishing; `exit_code`: 1 diverged, 130 Ctrl-C, 143 SIGTERM."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt (not caught by `except Exception`)."""


class StopSignals:
    """While entered (in the main thread) Ctrl-C and SIGTERM raise at once, or inside
    `deferred()` set `requested` to the signal number instead."""

    def __init__(self):
        self.requested: int | None = None
        self._deferring = False
        self._previous = {}
        self._previous_hook = sys.unraisablehook

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                previous = signal.getsignal(signum)
                if previous is signal.SIG_IGN:  # nohup'd: stays ignored
                    continue
                # a handler that noted a signal before (the `jpeft` launcher's) passes it on
                self.requested = self.requested or getattr(previous, "requested", None)
                self._previous[signum] = signal.signal(signum, self._handle)
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = self._previous_hook

    def _unraisable(self, unraisable) -> None:
        """Swallow our own stop exceptions where they cannot propagate (they are noted)."""
        if not isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
            self._previous_hook(unraisable)

    @contextlib.contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def check(self) -> None:
        """Raise KeyboardInterrupt / Terminated for a signal that came and was swallowed."""
        if self.requested == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested == signal.SIGTERM:
            raise Terminated()

    def stopped(self, what: str) -> RunStopped:
        """The RunStopped for the requested signal; `what`: where it left the run."""
        return RunStopped(f"{STOP_NAMES[self.requested]} {what}", EXIT_CODES[self.requested])

    def _handle(self, signum, frame) -> None:
        again = self.requested == signum == signal.SIGINT
        self.requested = signum
        if self._deferring and not again:
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated()
