"""``load``: a model from any checkpoint folder, whichever of the three layouts it holds."""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gptoss_jax.checkpoints.folder import log_status
from gptoss_jax.checkpoints.orbax_format import is_converted_checkpoint, restore
from gptoss_jax.checkpoints.parameters import build_model
from gptoss_jax.checkpoints.safetensors_reader import SafetensorsCheckpoint
from gptoss_jax.kernel_dispatch import KernelChoice
from gptoss_jax.model import GptOss


def load(
    path: str | os.PathLike, dtype: jnp.dtype = jnp.bfloat16, kernels: KernelChoice = "auto",
    mesh: jax.sharding.Mesh | None = None, progress: bool = False,
    on_status: Callable[[str], None] = log_status,
) -> GptOss:
    """A model from a converted checkpoint or a raw safetensors folder (HF root or ``original/``).

    Args:
      path: the checkpoint folder.
      dtype: compute dtype, ``bfloat16`` (the reference's numerics) or ``float32``.
      kernels: ``auto``, ``pallas`` or ``xla``.
      mesh: shard the model over this mesh (:func:`gptoss_jax.sharding.make_mesh`); each
        process reads and places only its devices' shards, one tensor at a time (from a raw
        folder through safetensors' slices, from a converted one through orbax).
      progress: draw a progress bar (tensors and bytes placed) on stderr when it is a terminal.
      on_status: called with one line when the folder's expert weights are dense (bfloat16,
        float16 or float32, as fine-tuning recipes save them in Hugging Face's layout) and are
        quantized to MXFP4 as they load (default: logged at INFO level).

    Returns:
      The model; ``model(tokens)`` maps int32 ``[B, T]`` to float32 logits ``[B, T, V]``.

    Raises:
      CheckpointError, LayoutError, ConfigError: the folder cannot be read as
      a gpt-oss checkpoint; the message names the file and tensor.
    """
    if is_converted_checkpoint(path):
        return restore(path, dtype=dtype, kernels=kernels, mesh=mesh, progress=progress)
    source = SafetensorsCheckpoint(path)
    note = source.quantization_note()
    if note is not None:
        on_status(note)
    return build_model(source.config, source.stored_parameters(), dtype=dtype, kernels=kernels, mesh=mesh,
                       progress=progress)
