"""The `jpeft` command's entry point, outside the `jpeft` package so that importing it is instant.

Importing `jpeft` starts JAX and takes seconds; Ctrl-C in those seconds would print a traceback
from deep inside an import. Here it prints one line and exits with 130, as Ctrl-C does later.
"""

import sys


def main() -> int:
    try:
        from jpeft.cli import main as run
    except KeyboardInterrupt:
        print("jpeft: interrupted (Ctrl-C) while starting; nothing was done", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
