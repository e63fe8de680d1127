"""The ``gptoss-jax`` command line.

Each subcommand is one ``add_<name>(subparsers)`` function that declares its arguments and
sets ``run`` to the function doing the work; add new ones to ``SUBCOMMANDS``:

- :mod:`~gptoss_jax.cli.commands`: ``convert`` and ``generate`` (a raw completion);
- :mod:`~gptoss_jax.cli.chat`: ``chat`` and ``demo``, the Harmony chat session and its printer;
- :mod:`~gptoss_jax.cli.env`: ``env``, what this machine offers (:mod:`gptoss_jax.environment`);
- :mod:`~gptoss_jax.cli.arguments`: the arguments several subcommands share, declared by small
  ``add_*_arguments(parser)`` helpers, and opening the model they name
  (:func:`gptoss_jax.opening.open_model` decides how);
- :mod:`~gptoss_jax.cli.generation`: generating in a worker thread, with Ctrl-C handling;
- :mod:`~gptoss_jax.cli.terminal`: status lines, stdin, stdout, exit statuses.

This module parses the command line, joins a multi-host run and turns expected failures into
exit statuses. Work functions import what they need themselves, so ``--help`` stays instant.
Expected failures (a bad checkpoint, an existing destination, an empty prompt...) print one line
``gptoss-jax: error: ...`` and exit 1; argparse's usage errors exit 2.

Generated text goes to stdout; progress, notes and throughput go to stderr. When the reader of
stdout goes away (``gptoss-jax generate ... | head``), generation stops and the command exits
quietly with status 141, as a Unix tool ended by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence

from gptoss_jax.cli import chat, commands, env, serve
from gptoss_jax.cli.terminal import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    PROG,
    InputError,
    report_interrupted,
    silence_stdout,
)
from gptoss_jax.errors import GptOssError
from gptoss_jax.opening import give_xla_most_of_the_gpu

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_FAILURE", "EXIT_INTERRUPTED", "PROG", "build_parser", "main"]

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    commands.add_convert, commands.add_generate, chat.add_chat, chat.add_demo, serve.add_serve, env.add_env,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of ``SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(prog=PROG, description="gpt-oss-20b and gpt-oss-120b in JAX.")
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def _enable_compilation_cache() -> None:
    """Keep compiled programs on disk between runs (compiling dominates a short CPU run).

    A cache folder the user configured for JAX is left as it is.
    """
    import jax

    from gptoss_jax.cache_folder import cache_root

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "jax-compilation"))


def _is_secondary_process() -> bool:
    import jax

    return jax.process_count() > 1 and jax.process_index() != 0


def _start_distributed(args: argparse.Namespace) -> None:
    """Join JAX's distributed runtime when asked to, before anything touches a device."""
    asked = any(getattr(args, name, None) is not None for name in ("coordinator", "num_processes", "process_id"))
    if asked or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        from gptoss_jax.sharding import initialize_distributed

        try:
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        except ValueError as e:  # only JAX knows what a cluster manager would have filled in
            raise InputError(
                f"cannot start the multi-host run ({e}): pass --coordinator HOST:PORT, --num-processes N "
                "and --process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID) "
                "unless a cluster manager (Slurm, Open MPI, Kubernetes) sets them"
            ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script passes it to exit)."""
    args = build_parser().parse_args(argv)
    give_xla_most_of_the_gpu()  # before anything starts the backend
    _enable_compilation_cache()
    try:
        _start_distributed(args)
        if _is_secondary_process():
            # Every process runs the same program; one of them speaks.
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                return args.run(args)
        return args.run(args)
    except KeyboardInterrupt:
        return report_interrupted()
    except BrokenPipeError:  # generate re-raises it from the streamer, after stopping the loop
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except (GptOssError, OSError) as e:  # the user's input or files: no traceback
        message = " ".join(str(e).split())  # one line, whatever the exception's formatting
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
