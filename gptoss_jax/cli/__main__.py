"""``python -m gptoss_jax.cli``: the ``gptoss-jax`` command without the console script."""

import sys

from gptoss_jax.cli import main

if __name__ == "__main__":  # importing it (as a walk over the package does) runs nothing
    sys.exit(main())
