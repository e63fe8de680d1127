"""The embedded demo checkpoint: a small gpt-oss-shaped model made on the spot, no download.

A model of the ``small`` preset with random weights from a fixed seed is written as a Hugging
Face safetensors checkpoint (MXFP4 experts, ``config.json``) with a demo ``tokenizer.json``
beside it, in a cache folder. Callers load it with ``gptoss_jax.load`` like any checkpoint, so
the writer, the streaming reader and the model all run on a fresh machine. The weights are
random: the model's text is gibberish.

The folder is ``<cache>/demo-<hash>``, where ``<cache>`` is ``$GPTOSS_JAX_CACHE``, else
``$XDG_CACHE_HOME/gptoss-jax``, else ``~/.cache/gptoss-jax``, and the hash covers everything
the checkpoint is made from. It appears atomically (written beside, then renamed), so a folder
that exists is complete and is reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gptoss_jax.cache_folder import cache_root
from gptoss_jax.config import GptOssConfig, preset

DEMO_PRESET = "small"
DEMO_SEED = 0
# Bump when the way the demo checkpoint is made changes, so that stale folders are not reused.
DEMO_FORMAT_VERSION = 2


def demo_config() -> GptOssConfig:
    """The demo model's configuration (the ``small`` preset)."""
    return preset(DEMO_PRESET)


def demo_checkpoint_dir() -> Path:
    """The demo checkpoint's folder in the cache (it may not exist yet)."""
    recipe = {"config": demo_config().to_dict(), "seed": DEMO_SEED, "version": DEMO_FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"demo-{digest}"


def ensure_demo_checkpoint(on_create: Callable[[Path], None] | None = None) -> Path:
    """The demo checkpoint's folder, written first if the cache does not hold it.

    Args:
      on_create: called with the folder before writing it (to tell the user why they wait).

    Returns:
      A folder with ``config.json``, ``model.safetensors`` (HF layout) and ``tokenizer.json``.
    """
    folder = demo_checkpoint_dir()
    if folder.is_dir():
        return folder
    if on_create is not None:
        on_create(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _write_demo_checkpoint(staging)
        try:
            staging.rename(folder)
        except OSError:
            # Another process finished the same folder first; its copy is identical.
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_demo_checkpoint(folder: Path) -> None:
    import jax
    from flax import nnx

    from gptoss_jax.checkpoints.layouts import Layout
    from gptoss_jax.checkpoints.safetensors_writer import write_checkpoint
    from gptoss_jax.model import GptOss
    from gptoss_jax.tokenizer import build_demo_tokenizer

    config = demo_config()
    # The "rbg" generator: threefry's per-shape compilations make eager initialisation take
    # about 30 s on a 2-core CPU, rbg's a few seconds.
    rngs = nnx.Rngs(jax.random.key(DEMO_SEED, impl="rbg"))
    model = GptOss(config, kernels="xla", rngs=rngs)
    write_checkpoint(model, folder, Layout.HF)
    build_demo_tokenizer(config.vocab_size).save(folder)
