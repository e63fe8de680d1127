"""Where gptoss-jax keeps the files it makes: the demo checkpoint, JAX's compilation cache, the
kernels' first-use verdicts."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "GPTOSS_JAX_CACHE"


def cache_root() -> Path:
    """Where gptoss-jax keeps files it makes: ``$GPTOSS_JAX_CACHE``, else the XDG cache folder."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "gptoss-jax"
