"""Writer of the project's checkpoint (format: :mod:`gptoss_jax.checkpoints.orbax_format`), atomically.

Everything goes into a hidden temporary sibling of the destination, renamed into place only
when complete; any error, Ctrl-C included, removes it, so the destination either does not
exist or holds a whole checkpoint. Orbax saves a pytree only from memory as a whole, so each
parameter group (one layer, the embedding...) is saved as its own item as soon as the
streaming reader has produced it: host memory stays near one layer, never the whole model.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

from gptoss_jax.checkpoints.folder import CONFIG_FILENAME
from gptoss_jax.checkpoints.orbax_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MARKER_FILENAME,
    PARAMS_DIRNAME,
    nest,
    parameter_group,
    parameter_groups,
)
from gptoss_jax.checkpoints.safetensors_reader import SafetensorsCheckpoint
from gptoss_jax.progress import ProgressBar
from gptoss_jax.tokenizer import TOKENIZER_FILENAME, checkpoint_tokenizer_file


class ConversionWarning(UserWarning):
    """Something the user should fix in a checkpoint that was converted all the same."""


def _write_parameters(source: SafetensorsCheckpoint, params_dir: Path, progress: bool) -> None:
    import orbax.checkpoint as ocp  # a second of import time; only writing needs it

    with (
        ProgressBar("converting", len(source), source.total_bytes, enabled=progress) as bar,
        ocp.StandardCheckpointer() as checkpointer,
    ):
        for group, parameters in itertools.groupby(source.parameters(), key=lambda item: parameter_group(item[0])):
            arrays = {}
            for path, array in parameters:
                arrays[path] = array
                bar.advance(array.nbytes)
            checkpointer.save((params_dir / group).absolute(), nest(group, arrays))
            # Waiting here keeps one group in memory; orbax would otherwise queue them all.
            checkpointer.wait_until_finished()


def _write_metadata(source: SafetensorsCheckpoint, folder: Path) -> None:
    (folder / CONFIG_FILENAME).write_text(json.dumps(source.config.to_dict(), indent=2) + "\n")
    marker = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "groups": parameter_groups(source.config),
        "source_layout": source.layout.value,
    }
    (folder / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")


def _copy_tokenizer(source: SafetensorsCheckpoint, folder: Path) -> None:
    tokenizer = checkpoint_tokenizer_file(source.folder)
    if tokenizer is None:
        # The weights alone are still a valid checkpoint (gptoss_jax.load reads them), but the
        # CLI and Tokenizer.from_pretrained_dir need the tokenizer beside them.
        warnings.warn(
            f"{source.folder} has no {TOKENIZER_FILENAME} (nor, for an original/ folder, its parent): "
            f"the converted checkpoint has none; copy gpt-oss's {TOKENIZER_FILENAME} into it before "
            "running the CLI on it",
            ConversionWarning,
            stacklevel=3,
        )
        return
    shutil.copyfile(tokenizer, folder / TOKENIZER_FILENAME)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, progress: bool = True) -> Path:
    """Convert a raw gpt-oss safetensors folder (HF root or ``original/``) into DST.

    Args:
      src: the checkpoint folder; its layout is detected from ``config.json``.
      dst: the new checkpoint folder; it must not exist. Missing parent folders are made.
      progress: draw a progress bar on stderr when stderr is a terminal.

    ``tokenizer.json`` is copied along from ``src``, or for an ``original/`` folder from its
    parent (where gpt-oss's Hugging Face repositories keep it); a warning says when there is none.

    Returns:
      ``dst``.

    Raises:
      FileExistsError: ``dst`` exists (it is left untouched).
      LayoutError, ConfigError, CheckpointError: ``src`` is not a valid checkpoint; nothing
        is written, since every header is checked before any weight is read.
    """
    destination = Path(dst).absolute()
    if destination.exists() or destination.is_symlink():
        raise FileExistsError(f"{dst} already exists; choose a new destination folder")
    source = SafetensorsCheckpoint(src)
    staging = destination.parent / f".{destination.name}.converting-{uuid.uuid4().hex[:8]}"
    made_parents: list[Path] = []
    try:
        # Missing parents are made, as `mkdir -p` would, and removed again if the conversion fails.
        for folder in reversed(destination.parents):
            if not folder.exists():
                folder.mkdir()
                made_parents.append(folder)
        staging.mkdir()
        _write_parameters(source, staging / PARAMS_DIRNAME, progress)
        _write_metadata(source, staging)
        _copy_tokenizer(source, staging)
        if destination.exists():
            raise FileExistsError(f"{destination} appeared while converting; the conversion was discarded")
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(made_parents):
            with contextlib.suppress(OSError):  # something else was put there meanwhile
                folder.rmdir()
        raise
    return Path(dst)
