"""The `jpeft` command's entry point, outside the `jpeft` package so that importing it is instant.

Importing `jpeft` starts JAX and takes seconds, and a KeyboardInterrupt raised in those seconds
can crash the process (raised while jaxlib's C++ extension initialises, it segfaults) or be
swallowed (raised in a callback JAX runs from C++). So while importing, Ctrl-C is only noted, and
a noted Ctrl-C ends the command, in one line, once the import is done; after that it raises
KeyboardInterrupt as usual, and `jpeft.finetune.stopping.StopSignals` takes over any note when a
job starts. A command stopped by a signal exits without the interpreter's teardown, which can
crash while JAX's threads are still busy (the job has finished writing and closed its files).
"""

import os
import signal
import sys

STOPPED_BY_SIGNAL = (130, 143)  # the exit codes of `jpeft` after Ctrl-C and SIGTERM


class Interrupts:
    """A SIGINT handler that notes the signal (`requested`), and raises KeyboardInterrupt once
    `raising` is set."""

    def __init__(self):
        self.requested = None
        self.raising = False

    def __call__(self, signum, frame):
        self.requested = signum
        if self.raising:
            raise KeyboardInterrupt


def _hide_swallowed_interrupts(unraisable, previous=sys.unraisablehook) -> None:
    """Python's report of an exception it could not raise, except for a (noted) Ctrl-C."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        previous(unraisable)


def main() -> int:
    interrupts = Interrupts()
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupts)
    sys.unraisablehook = _hide_swallowed_interrupts
    from jpeft.cli import main as run

    if interrupts.requested is not None:
        print("jpeft: interrupted (Ctrl-C) while starting; nothing was done", file=sys.stderr)
        return 130
    interrupts.raising = True
    code = run()
    if code in STOPPED_BY_SIGNAL:  # JAX's threads may be mid-work: skip the interpreter's
        sys.stdout.flush()  # teardown, which can then crash (the run has closed its files)
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
