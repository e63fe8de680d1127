"""The ``gptoss-jax`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and
sets ``run`` to the function doing the work; add new ones to ``SUBCOMMANDS``. Work functions
import what they need themselves, so ``--help`` stays instant. Expected failures (a bad
checkpoint, an existing destination...) print one line ``gptoss-jax: error: ...`` and exit 1;
argparse's usage errors exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

PROG = "gptoss-jax"
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def _run_convert(args: argparse.Namespace) -> int:
    from convert import convert_checkpoint

    destination = convert_checkpoint(args.src, args.dst, progress=not args.no_progress)
    print(f"wrote {destination}")
    return 0


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a gpt-oss safetensors checkpoint into this project's format",
        description=(
            "Convert a gpt-oss safetensors checkpoint into this project's orbax checkpoint. "
            "SRC is either a Hugging Face root folder (config.json with model_type gpt_oss, "
            "model.safetensors or shards with model.safetensors.index.json) or OpenAI's "
            "original/ folder (config.json and model.safetensors); the layout is detected. "
            "Every tensor name, shape and dtype is checked against config.json before any "
            "weight is read, tensors are streamed one at a time, and DST appears only once "
            "complete: on any error nothing is left behind. tokenizer.json is copied along "
            "when SRC has one. Load the result with gptoss_jax.load(DST)."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="the safetensors checkpoint folder to read")
    parser.add_argument("dst", metavar="DST", help="the folder to create (must not exist)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar on stderr")
    parser.set_defaults(run=_run_convert)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_convert]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of ``SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(prog=PROG, description="gpt-oss-20b and gpt-oss-120b in JAX.")
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures caused by the user's input, reported without a traceback."""
    from convert.layouts import LayoutError
    from gptoss_jax.checkpoint import CheckpointError
    from gptoss_jax.config import ConfigError

    return CheckpointError, LayoutError, ConfigError, OSError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script passes it to exit)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _expected_errors() as e:
        message = " ".join(str(e).split())  # one line, whatever the exception's formatting
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
