"""The CLI's side of the terminal: its name, exit statuses, status lines, stdin and stdout.

Generated text goes to stdout; progress, notes and throughput go to stderr (:func:`status`).
"""

from __future__ import annotations

import os
import sys

from gptoss_jax.errors import GptOssError

PROG = "gptoss-jax"
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
# What a shell reports for a command that SIGPIPE ended, as it ends `yes | head`: a script
# with `set -o pipefail` sees the same status as for a Unix tool, not this CLI's error status.
EXIT_BROKEN_PIPE = 141


class InputError(GptOssError):
    """Bad command-line input, reported as one line."""


def status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report_interrupted() -> int:
    status(f"{PROG}: interrupted")
    return EXIT_INTERRUPTED


def checked_text(text: str, what: str) -> str:
    if not text.strip():
        raise InputError(f"the {what} is empty")
    return text


def stdin_is_a_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()  # None: the process started with stdin closed


def text_from_stdin(what: str) -> str:
    """The whole of stdin, which must be open and not a terminal (then the text was expected as an
    argument)."""
    if sys.stdin is None or stdin_is_a_terminal():
        raise InputError(f"no {what} given: pass it as an argument or pipe it to stdin")
    return checked_text(sys.stdin.read().rstrip("\n"), what)


def silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, so that flushing it at exit cannot fail again."""
    try:
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError):  # main() called with sys.stdout replaced by an object in memory
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)
