"""Writer of the project's checkpoint (format: :mod:`gptoss_jax.checkpoints.orbax_format`), atomically.

Everything goes into a hidden temporary sibling of the destination, renamed into place only
when complete (:mod:`~gptoss_jax.checkpoints.staging`). Orbax saves a pytree only from memory as a whole, so each
parameter group (one layer, the embedding...) is saved as its own item as soon as the
streaming reader has produced it: host memory stays near one layer, never the whole model.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from gptoss_jax.checkpoints.folder import CONFIG_FILENAME, log_status
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
from gptoss_jax.checkpoints.staging import check_new_destination, staged_folder
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


def copy_tokenizer(source_folder: Path, folder: Path) -> None:
    """Copy the tokenizer of a checkpoint folder (for ``original/``, its parent's) into ``folder``;
    a :class:`ConversionWarning` when there is none."""
    tokenizer = checkpoint_tokenizer_file(source_folder)
    if tokenizer is None:
        # The weights alone are still a valid checkpoint (gptoss_jax.load reads them), but the
        # CLI and Tokenizer.from_pretrained_dir need the tokenizer beside them.
        warnings.warn(
            f"{source_folder} has no {TOKENIZER_FILENAME} (nor, for an original/ folder, its parent): "
            f"the converted checkpoint has none; copy gpt-oss's {TOKENIZER_FILENAME} into it before "
            "running the CLI on it",
            ConversionWarning,
            stacklevel=3,
        )
        return
    shutil.copyfile(tokenizer, folder / TOKENIZER_FILENAME)


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, progress: bool = True,
    on_status: Callable[[str], None] = log_status,
) -> Path:
    """Convert a raw gpt-oss safetensors folder (HF root or ``original/``) into DST.

    Args:
      src: the checkpoint folder; its layout is detected from ``config.json``. Dense expert
        weights (bfloat16, float16 or float32, as fine-tuning recipes save them in Hugging
        Face's layout) are quantized to MXFP4 on the way.
      dst: the new checkpoint folder; it must not exist. Missing parent folders are made.
      progress: draw a progress bar on stderr when stderr is a terminal.
      on_status: called with the line saying dense experts are being quantized, if they are
        (default: logged at INFO level).

    ``tokenizer.json`` is copied along from ``src``, or for an ``original/`` folder from its
    parent (where gpt-oss's Hugging Face repositories keep it); a warning says when there is none.

    Returns:
      ``dst``.

    Raises:
      FileExistsError: ``dst`` exists (it is left untouched).
      LayoutError, ConfigError, CheckpointError: ``src`` is not a valid checkpoint; nothing
        is left written: every header is checked before any weight is read, and a weight found
        bad while reading (a NaN in dense experts) discards what was written.
    """
    check_new_destination(dst)
    source = SafetensorsCheckpoint(src)
    note = source.quantization_note()
    if note is not None:
        on_status(note)
    with staged_folder(dst, "converting") as staging:
        _write_parameters(source, staging / PARAMS_DIRNAME, progress)
        _write_metadata(source, staging)
        copy_tokenizer(source.folder, staging)
    return Path(dst)
