"""What every console command that prints listings shares: a reader that stops early (`| head`) ends it
quietly, as with any Unix tool, instead of an "[Errno 32] Broken pipe" line or traceback."""

from __future__ import annotations

import functools
import os
import sys


def quiet_on_closed_stdout(main):
    """Wrap a console main(argv) -> exit code. On a closed stdout: no message, exit status 1, as CPython's note
    on SIGPIPE recommends (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            code = main(argv)
            sys.stdout.flush()  # buffered output meets the closed pipe here, inside the try
            return code
        except BrokenPipeError:
            # Python flushes stdout once more at exit; pointed at devnull, that flush cannot fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1

    return run
