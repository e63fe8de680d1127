"""The project's own checkpoint format (what ``gptoss-jax convert`` writes), and restoring it.

A converted checkpoint (written by :func:`gptoss_jax.checkpoints.orbax_writer.convert_checkpoint`)
is a folder::

    config.json                  GptOssConfig.to_dict() (the original/ dialect)
    gptoss_jax_checkpoint.json   {"format": "gptoss-jax-checkpoint", "version": 2, "groups": [...]}
    params/<group>/              one orbax (StandardCheckpointer) item per parameter group
    tokenizer.json               the source's (for original/, its parent's), when it had one

A parameter group is one top-level module of the model, with the layer list expanded:
``embedding``, ``norm``, ``unembedding``, ``block.0`` ... ``block.{L-1}``. Orbax writes a
pytree only from memory as a whole, so one item per group bounds the converter's host memory
by one layer (plus the largest single tensor), not the whole model, and restore can place each
group on its target devices before reading the next. Inside an item the tree is nested dicts
following the rest of the parameter path (``attn -> qkv -> weight``).

Parameter paths are those of :mod:`gptoss_jax.checkpoints.parameters`. Arrays are stored as the
model holds them: version 2 groups the fused QKV rows by KV head (``model.fused_qkv_order``), so
a tensor-parallel restore reads each device's heads straight from disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.checkpoints.folder import CONFIG_FILENAME, CheckpointError
from gptoss_jax.checkpoints.parameters import build_model, parameter_shardings, parameter_specs
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernel_dispatch import KernelChoice
from gptoss_jax.model import GptOss

FORMAT_NAME = "gptoss-jax-checkpoint"
FORMAT_VERSION = 2
MARKER_FILENAME = "gptoss_jax_checkpoint.json"
PARAMS_DIRNAME = "params"


def parameter_group(path: str) -> str:
    """The group (one orbax item) a parameter belongs to: ``block.3.attn.sinks`` -> ``block.3``."""
    parts = path.split(".")
    return ".".join(parts[:2]) if parts[0] == "block" else parts[0]


def parameter_groups(config: GptOssConfig) -> list[str]:
    """The groups of a model, in the order the converter writes them."""
    return list(dict.fromkeys(parameter_group(path) for path in parameter_specs(config)))


def nest(group: str, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters of one group ``{path: leaf}`` -> the nested dict stored as its orbax item."""
    tree: dict[str, Any] = {}
    for path, leaf in arrays.items():
        *parents, name = path.removeprefix(group + ".").split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = leaf
    return tree


def _flatten(group: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`nest`."""
    flat = {}
    for key, value in tree.items():
        path = f"{group}.{key}"
        flat.update(_flatten(path, value) if isinstance(value, Mapping) else {path: value})
    return flat


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``gptoss-jax convert`` (:func:`gptoss_jax.checkpoints.orbax_writer.convert_checkpoint`)."""
    return (Path(path) / MARKER_FILENAME).is_file()


def _read_marker(folder: Path) -> dict[str, Any]:
    marker_path = folder / MARKER_FILENAME
    if not marker_path.is_file():
        raise CheckpointError(
            f"{folder}: not a converted gptoss-jax checkpoint (no {MARKER_FILENAME}); convert it "
            f"with `gptoss-jax convert`, or pass a raw safetensors folder to gptoss_jax.load"
        )
    try:
        marker = json.loads(marker_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{marker_path}: not valid JSON ({e})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{marker_path}: format is not {FORMAT_NAME!r}")
    if marker.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{marker_path}: format version {marker.get('version')!r}; this gptoss-jax reads version "
            f"{FORMAT_VERSION}"
        )
    return marker


def _restored_parameters(
    folder: Path, config: GptOssConfig, shardings: Mapping[str, jax.sharding.Sharding] | None
) -> Iterable[tuple[str, jax.Array]]:
    """Yield ``(path, array)`` group by group, each array read straight onto its target devices."""
    import orbax.checkpoint as ocp  # costs a second at import; only restoring needs it

    specs = parameter_specs(config)
    default_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    grouped: dict[str, dict[str, jax.ShapeDtypeStruct]] = {}
    for path, spec in specs.items():
        sharding = shardings.get(path, default_sharding) if shardings is not None else default_sharding
        target = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)
        grouped.setdefault(parameter_group(path), {})[path] = target
    with ocp.StandardCheckpointer() as checkpointer:
        for group, targets in grouped.items():
            item_path = (folder / PARAMS_DIRNAME / group).absolute()
            if not item_path.is_dir():
                raise CheckpointError(f"{item_path}: missing parameter group {group!r}")
            _check_item_metadata(checkpointer, item_path, group, targets)
            try:
                restored = checkpointer.restore(item_path, nest(group, targets))
            except Exception as e:  # orbax raises bare Exception too, e.g. for a cut data file
                raise CheckpointError(f"{item_path}: cannot restore ({_innermost_reason(e)})") from e
            yield from _flatten(group, restored).items()


def _innermost_reason(error: BaseException) -> str:
    """The first line of the innermost cause's message.

    Orbax wraps TensorStore's reason (which names the tensor and the bad byte range) in an
    exception whose message spells out the array's whole TensorStore spec, dozens of lines.
    """
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _check_item_metadata(
    checkpointer: Any, item_path: Path, group: str, targets: Mapping[str, jax.ShapeDtypeStruct]
) -> None:
    """Compare an item's stored names, shapes and dtypes with the model's before reading any data."""
    try:
        metadata = checkpointer.metadata(item_path).item_metadata
    except Exception as e:  # as for restoring: orbax's own exceptions are not all ValueErrors
        raise CheckpointError(f"{item_path}: unreadable orbax metadata ({_innermost_reason(e)})") from e
    if metadata is None:  # what orbax returns for a cut or missing _METADATA or manifest
        raise CheckpointError(f"{item_path}: unreadable orbax metadata (orbax found none)")
    stored = _flatten(group, metadata.tree)
    mismatched = sorted(set(targets) ^ set(stored))
    if mismatched:
        problem = "missing" if mismatched[0] in targets else "unexpected"
        raise CheckpointError(f"{item_path}: {problem} parameter {mismatched[0]!r}")
    for path, target in targets.items():
        shape, dtype = tuple(stored[path].shape), np.dtype(stored[path].dtype)
        if shape != target.shape or dtype != target.dtype:
            raise CheckpointError(
                f"{item_path}: parameter {path!r} is {dtype}{list(shape)}, "
                f"the config needs {target.dtype}{list(target.shape)}"
            )


def converted_config(path: str | os.PathLike) -> GptOssConfig:
    """The config of a converted checkpoint, checked against its marker.

    Raises:
      CheckpointError: not a converted checkpoint (of this format version), or its marker's
        parameter groups do not match its config.
    """
    folder = Path(path)
    marker = _read_marker(folder)
    if not (folder / CONFIG_FILENAME).is_file():
        raise CheckpointError(f"{folder}: converted checkpoint without {CONFIG_FILENAME}")
    config = GptOssConfig.from_json_file(folder / CONFIG_FILENAME)
    if marker.get("groups") != parameter_groups(config):
        raise CheckpointError(
            f"{folder / MARKER_FILENAME}: its parameter groups do not match {CONFIG_FILENAME} "
            f"({config.num_hidden_layers} layers)"
        )
    return config


def converted_parameters(path: str | os.PathLike) -> Iterator[tuple[str, jax.Array]]:
    """``(parameter path, array)`` of a converted checkpoint, one group at a time on the default
    device (:func:`converted_config` checks the folder first)."""
    folder = Path(path)
    yield from _restored_parameters(folder, converted_config(folder), None)


def restore(
    path: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    kernels: KernelChoice = "auto",
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> GptOss:
    """Load a converted checkpoint into a model; each weight is created once, on its devices.

    Args:
      path: a folder written by ``gptoss-jax convert``.
      dtype: compute dtype of the model (``bfloat16`` or ``float32``); parameters keep theirs.
      kernels: ``auto``, ``pallas`` or ``xla`` (see :mod:`gptoss_jax.kernel_dispatch`).
      shardings: parameter path -> target sharding; orbax reads each array straight into it,
        each process only the shards its devices hold. Parameters not named follow ``mesh``'s
        partition rules, or go to the default device without a mesh.
      mesh: a mesh from :func:`gptoss_jax.sharding.make_mesh`; the model runs sharded on it.
      progress: draw a progress bar on stderr when it is a terminal.

    Raises:
      CheckpointError: the folder is not a converted checkpoint or does not match its config.
    """
    folder = Path(path)
    config = converted_config(folder)
    if mesh is not None:
        shardings = {**parameter_shardings(config, mesh), **(shardings or {})}  # for orbax too
    return build_model(
        config, _restored_parameters(folder, config, shardings), dtype=dtype, kernels=kernels,
        shardings=shardings, mesh=mesh, progress=progress,
    )
