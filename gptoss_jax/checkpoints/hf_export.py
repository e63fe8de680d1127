"""``gptoss-jax convert --to hf``: any checkpoint this project reads, written in OpenAI's
published Hugging Face layout.

That layout (the ``openai/gpt-oss-20b`` and ``-120b`` repositories' root folders) is
``config.json`` with ``quantization_config`` ``{"quant_method": "mxfp4", ...}``, the experts as
MXFP4 ``..._blocks`` and ``..._scales``, everything else bfloat16, in shards of about 4 GB
listed by ``model.safetensors.index.json``; transformers and vLLM load it. This is how a
fine-tuned model saved with dense experts ships as MXFP4: its experts are quantized by the OCP
rule as they are read (:mod:`~gptoss_jax.checkpoints.dense_experts`).

Parameters stream one at a time into shards (:mod:`~gptoss_jax.checkpoints.safetensors_writer`),
in a hidden folder renamed into place when whole (:mod:`~gptoss_jax.checkpoints.staging`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from gptoss_jax.checkpoints.folder import log_status
from gptoss_jax.checkpoints.layouts import Layout
from gptoss_jax.checkpoints.orbax_format import converted_config, converted_parameters, is_converted_checkpoint
from gptoss_jax.checkpoints.orbax_writer import copy_tokenizer
from gptoss_jax.checkpoints.parameters import parameter_specs
from gptoss_jax.checkpoints.safetensors_reader import SafetensorsCheckpoint
from gptoss_jax.checkpoints.safetensors_writer import PUBLISHED_SHARD_BYTES, write_parameters
from gptoss_jax.checkpoints.staging import check_new_destination, staged_folder
from gptoss_jax.config import GptOssConfig
from gptoss_jax.progress import ProgressBar


def _counted(parameters: Iterable[tuple[str, np.ndarray]], bar: ProgressBar) -> Iterator[tuple[str, np.ndarray]]:
    for path, array in parameters:
        yield path, array
        bar.advance(array.nbytes)


def export_hf_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_bytes: int = PUBLISHED_SHARD_BYTES,
    progress: bool = True, on_status: Callable[[str], None] = log_status,
) -> Path:
    """Write the checkpoint in ``src`` to the new folder ``dst`` in OpenAI's published HF layout.

    Args:
      src: a folder ``gptoss_jax.load`` reads: a Hugging Face root or ``original/`` folder
        (MXFP4 experts, or dense ones in the Hugging Face layout), or a converted checkpoint.
      dst: the new folder; it must not exist. Missing parent folders are made.
      max_shard_bytes: the largest shard (default 4 GB, as published).
      progress: draw a progress bar on stderr when stderr is a terminal.
      on_status: called with the line saying dense experts are being quantized, if they are
        (default: logged at INFO level).

    ``tokenizer.json`` is copied along as :func:`~gptoss_jax.checkpoints.orbax_writer.convert_checkpoint`
    does, with a warning when there is none.

    Returns:
      ``dst``.

    Raises:
      FileExistsError: ``dst`` exists (it is left untouched).
      LayoutError, ConfigError, CheckpointError: ``src`` cannot be read; nothing is left written.
    """
    check_new_destination(dst)
    config: GptOssConfig
    if is_converted_checkpoint(src):
        config, parameters = converted_config(src), converted_parameters(src)
    else:
        source = SafetensorsCheckpoint(src)
        note = source.quantization_note()
        if note is not None:
            on_status(note)
        config, parameters = source.config, source.parameters()
    specs = parameter_specs(config)
    total_bytes = sum(spec.size * spec.dtype.itemsize for spec in specs.values())
    with (staged_folder(dst, "exporting") as staging,
          ProgressBar("writing", len(specs), total_bytes, enabled=progress) as bar):
        write_parameters(config, _counted(parameters, bar), staging, Layout.HF, max_shard_bytes=max_shard_bytes)
        copy_tokenizer(Path(src), staging)
    return Path(dst)
