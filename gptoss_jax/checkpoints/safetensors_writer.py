"""Write a model's weights as a public safetensors checkpoint, in either layout.

The inverse of reading: the embedded demo model and the tests' tiny random models are written
this way, so the loading and converting code always runs on the real on-disk formats, and so
that Hugging Face ``transformers`` can load the same files as an independent oracle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from gptoss_jax.checkpoints.layouts import Layout, parameter_sources, qkv_split_rows, to_checkpoint_rows
from gptoss_jax.config import GptOssConfig, to_hf_dict
from gptoss_jax.model import GptOss


def model_tensors(model: GptOss) -> dict[str, np.ndarray]:
    """The model's parameters as host arrays, keyed by parameter path (= original/ names), in the model's
    row order (see :func:`gptoss_jax.checkpoints.layouts.checkpoint_rows`)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): np.asarray(variable[...]) for path, variable in flat}


def _split_sources(
    config: GptOssConfig, tensors: dict[str, np.ndarray], layout: Layout
) -> dict[str, np.ndarray]:
    """Rename (and for HF, split QKV) into the layout's tensor names, in the checkpoint dtypes."""
    out = {}
    for path, names in parameter_sources(config, layout).items():
        tensor = to_checkpoint_rows(config, path, tensors[path])
        if path.endswith("norm.scale"):
            tensor = tensor.astype(np.asarray(tensors["embedding.weight"]).dtype)  # bf16 on disk
        if len(names) == 1:
            out[names[0]] = tensor
            continue
        boundaries = np.cumsum(qkv_split_rows(config))[:-1]
        for name, piece in zip(names, np.split(tensor, boundaries, axis=0)):
            out[name] = np.ascontiguousarray(piece)
    return out


def write_checkpoint(
    model: GptOss, folder: str | os.PathLike, layout: Layout, *, max_shard_bytes: int | None = None
) -> Path:
    """Write ``model`` to ``folder`` (created; must not hold a checkpoint) in ``layout``.

    Args:
      model: the model whose parameters to write.
      folder: the destination folder.
      layout: :class:`Layout.HF` (``config.json``, ``model-0000i-of-0000n.safetensors`` and
        ``model.safetensors.index.json`` when sharded) or :class:`Layout.ORIGINAL`
        (``config.json`` and ``model.safetensors``).
      max_shard_bytes: HF layout only: start a new shard once one reaches this size.

    Returns:
      The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.glob("*.safetensors")):
        raise FileExistsError(f"{folder} already holds a checkpoint")
    config = model.config
    tensors = _split_sources(config, model_tensors(model), layout)
    if layout is Layout.ORIGINAL:
        (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    (folder / "config.json").write_text(json.dumps(to_hf_dict(config), indent=2))
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        if max_shard_bytes is not None and shards[-1] and shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name))
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(tensor.nbytes for tensor in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
