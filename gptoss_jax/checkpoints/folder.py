"""A checkpoint folder, whatever its layout: every layout has a ``config.json`` beside its weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gptoss_jax.errors import GptOssError

CONFIG_FILENAME = "config.json"
_logger = logging.getLogger("gptoss_jax.checkpoints")


def log_status(line: str) -> None:
    """The default ``on_status`` of the readers and writers: log the line at INFO level."""
    _logger.info(line)


class CheckpointError(GptOssError):
    """A checkpoint that cannot be read: the message names the file and, where known, the tensor."""


def checked_checkpoint_folder(path: str | os.PathLike) -> Path:
    """``path``, checked to be a folder with a ``config.json``, as every checkpoint layout has.

    Raises:
      CheckpointError: ``path`` does not exist, is a file (``config.json`` itself, say: the
        message names the folder to pass instead), or is a folder without ``config.json``.
    """
    folder = Path(path)
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file: pass the checkpoint folder that holds it, {folder.parent}")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not (folder / CONFIG_FILENAME).is_file():
        raise CheckpointError(f"{folder}: not a gpt-oss checkpoint folder (no {CONFIG_FILENAME})")
    return folder
