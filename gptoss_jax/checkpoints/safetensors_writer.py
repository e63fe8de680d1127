"""Write a model's weights as a public safetensors checkpoint, in either layout.

The inverse of reading: the embedded demo model and the tests' tiny random models are written
this way, so the loading and converting code always runs on the real on-disk formats, and so
that Hugging Face ``transformers`` can load the same files as an independent oracle.
``gptoss-jax convert --to hf`` writes OpenAI's published Hugging Face layout this way too
(:mod:`~gptoss_jax.checkpoints.hf_export`).

Parameters stream through one at a time: a Hugging Face folder is written shard by shard, so
memory stays near one shard (``max_shard_bytes``) plus one parameter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from gptoss_jax.checkpoints.dense_experts import dense_from_mxfp4, dense_name, expert_weight
from gptoss_jax.checkpoints.folder import CONFIG_FILENAME
from gptoss_jax.checkpoints.layouts import Layout, parameter_sources, qkv_split_rows, to_checkpoint_rows
from gptoss_jax.config import GptOssConfig, to_hf_dict
from gptoss_jax.model import GptOss

INDEX_FILENAME = "model.safetensors.index.json"
PUBLISHED_SHARD_BYTES = 4 * 10**9
"""The shard size of OpenAI's published Hugging Face folders (about 4 GB each)."""


def model_tensors(model: GptOss) -> dict[str, np.ndarray]:
    """The model's parameters as host arrays, keyed by parameter path (= original/ names), in the model's
    row order (see :func:`gptoss_jax.checkpoints.layouts.checkpoint_rows`)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): np.asarray(variable[...]) for path, variable in flat}


def checkpoint_tensors(
    config: GptOssConfig, parameters: Iterable[tuple[str, np.ndarray | jax.Array]], layout: Layout,
    dense_experts: np.dtype | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """``(tensor name, array)`` of the layout, one parameter's worth at a time, from the model's
    ``(parameter path, array)`` stream.

    Tensors are renamed (for HF, the fused QKV split into q, k and v, in their row order) and
    RMSNorm gains written in bfloat16, as published. ``dense_experts`` (HF layout only): write
    the experts as fine-tuning recipes save them, dense in this dtype (:mod:`dense_experts`),
    from each weight's blocks and scales, which must come one after the other.
    """
    sources = parameter_sources(config, layout)
    pending_blocks: dict[str, np.ndarray] = {}
    for path, parameter in parameters:
        tensor = to_checkpoint_rows(config, path, np.asarray(parameter))
        weight = expert_weight(path)
        if dense_experts is not None and weight is not None:
            if path.endswith(".blocks"):
                pending_blocks[weight] = tensor
            else:
                yield dense_name(weight), dense_from_mxfp4(pending_blocks.pop(weight), tensor, dense_experts)
            continue
        if path.endswith("norm.scale"):
            tensor = tensor.astype(jax.numpy.bfloat16)
        names = sources[path]
        if len(names) == 1:
            yield names[0], tensor
            continue
        boundaries = np.cumsum(qkv_split_rows(config))[:-1]
        for name, piece in zip(names, np.split(tensor, boundaries, axis=0)):
            yield name, np.ascontiguousarray(piece)


def _write_shards(tensors: Iterable[tuple[str, np.ndarray]], folder: Path, max_shard_bytes: int | None) -> None:
    """Hugging Face's files: ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors``
    of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own) and their index."""
    shard_files: list[Path] = []
    weight_map: dict[str, int] = {}  # tensor name -> shard number
    shard: dict[str, np.ndarray] = {}
    total = 0

    def flush() -> None:
        shard_files.append(folder / f"model-{len(shard_files) + 1:05d}.safetensors.partial")
        save_file(shard, str(shard_files[-1]))
        weight_map.update(dict.fromkeys(shard, len(shard_files)))
        shard.clear()

    for name, tensor in tensors:
        full = sum(piece.nbytes for piece in shard.values())
        if max_shard_bytes is not None and shard and full + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = np.ascontiguousarray(tensor)  # safetensors writes the buffer as it lies in memory
        total += tensor.nbytes
    if not shard_files:
        save_file(shard, str(folder / "model.safetensors"))
        return
    flush()
    names = [f"model-{number:05d}-of-{len(shard_files):05d}.safetensors" for number in range(1, len(shard_files) + 1)]
    for file, name in zip(shard_files, names):
        file.rename(folder / name)
    index = {"metadata": {"total_size": total},
             "weight_map": {tensor: names[number - 1] for tensor, number in weight_map.items()}}
    (folder / INDEX_FILENAME).write_text(json.dumps(index, indent=2))


def write_parameters(
    config: GptOssConfig, parameters: Iterable[tuple[str, np.ndarray | jax.Array]], folder: str | os.PathLike,
    layout: Layout, *, max_shard_bytes: int | None = None, dense_experts: np.dtype | None = None,
) -> Path:
    """Write a stream of the model's ``(parameter path, array)`` to ``folder`` in ``layout``.

    Args:
      config: the model's configuration.
      parameters: every parameter once, in the model's shapes and row order.
      folder: the destination folder (created; must not hold a checkpoint).
      layout: :class:`Layout.HF` (``config.json`` in Hugging Face's dialect,
        ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json`` when sharded)
        or :class:`Layout.ORIGINAL` (``config.json`` and ``model.safetensors``).
      max_shard_bytes: HF layout only: start a new shard before one would exceed this size.
      dense_experts: HF layout only: write the experts dense in this dtype, as fine-tuning
        recipes save them (``config.json`` then has no ``quantization_config``, as transformers
        writes it); None: MXFP4 ``_blocks`` and ``_scales``, as OpenAI publishes them.

    Returns:
      The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.glob("*.safetensors")):
        raise FileExistsError(f"{folder} already holds a checkpoint")
    if layout is Layout.ORIGINAL and (max_shard_bytes is not None or dense_experts is not None):
        raise ValueError("OpenAI's original/ layout is one model.safetensors with MXFP4 experts")
    tensors = checkpoint_tensors(config, parameters, layout, dense_experts)
    if layout is Layout.ORIGINAL:
        (folder / CONFIG_FILENAME).write_text(json.dumps(config.to_dict(), indent=2))
        save_file(dict(tensors), str(folder / "model.safetensors"))
        return folder
    hf_config = to_hf_dict(config)
    if dense_experts is not None:
        del hf_config["quantization_config"]
    (folder / CONFIG_FILENAME).write_text(json.dumps(hf_config, indent=2))
    _write_shards(tensors, folder, max_shard_bytes)
    return folder


def write_checkpoint(
    model: GptOss, folder: str | os.PathLike, layout: Layout, *, max_shard_bytes: int | None = None,
    dense_experts: np.dtype | None = None,
) -> Path:
    """Write ``model`` to ``folder`` in ``layout``: :func:`write_parameters` of its parameters."""
    return write_parameters(model.config, model_tensors(model).items(), folder, layout,
                            max_shard_bytes=max_shard_bytes, dense_experts=dense_experts)
