"""Harmony, gpt-oss's chat format: harmony.py moved into this package, to be split by concept."""

from gptoss_jax.harmony.parser import *  # noqa: F401,F403
