"""gpt-oss in JAX: ``load`` a checkpoint (``convert_checkpoint`` one), or build ``GptOss`` from a config.

Names resolve on first use, so ``import gptoss_jax`` (and ``gptoss-jax --help``) does not pay
for importing JAX and Flax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptoss_jax.checkpoints.loading import load
    from gptoss_jax.checkpoints.orbax_writer import convert_checkpoint
    from gptoss_jax.config import GptOssConfig, preset
    from gptoss_jax.generate import generate
    from gptoss_jax.model import GptOss

__all__ = ["GptOss", "GptOssConfig", "convert_checkpoint", "generate", "load", "preset"]

_HOME_MODULES = {
    "GptOss": "gptoss_jax.model",
    "GptOssConfig": "gptoss_jax.config",
    "convert_checkpoint": "gptoss_jax.checkpoints.orbax_writer",
    "generate": "gptoss_jax.generate",
    "load": "gptoss_jax.checkpoints.loading",
    "preset": "gptoss_jax.config",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME_MODULES:
        raise AttributeError(f"module 'gptoss_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME_MODULES[name]), name)
    globals()[name] = value  # later look-ups skip this hook
    return value
