"""``python -m convert SRC DST [--no-progress]``: ``gptoss-jax convert`` from a source checkout."""

import sys

from gptoss_jax.cli import main

if __name__ == "__main__":  # importing it runs nothing
    sys.exit(main(["convert", *sys.argv[1:]]))
