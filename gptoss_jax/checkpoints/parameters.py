"""The model's parameters by path, and building a model from any stream of weights.

Parameter paths are the model's state paths joined by dots, which are also the tensor names of
OpenAI's ``original/`` checkpoints (``block.0.mlp.mlp1_weight.blocks``). Every reader of a
checkpoint layout yields ``(path, array)`` pairs, which :func:`build_model` places on the devices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import sharding as sharding_rules
from gptoss_jax.checkpoints.folder import CheckpointError
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernel_dispatch import KernelChoice
from gptoss_jax.model import GptOss
from gptoss_jax.progress import ProgressBar


def abstract_model(
    config: GptOssConfig, *, dtype: jnp.dtype = jnp.bfloat16, kernels: KernelChoice = "auto",
    mesh: jax.sharding.Mesh | None = None,
) -> GptOss:
    """The model with ``jax.ShapeDtypeStruct`` in place of every parameter: nothing is allocated."""
    return nnx.eval_shape(lambda: GptOss(config, dtype=dtype, kernels=kernels, mesh=mesh, rngs=nnx.Rngs(0)))


def parameter_shardings(config: GptOssConfig, mesh: jax.sharding.Mesh) -> dict[str, jax.sharding.NamedSharding]:
    """Every parameter path -> its sharding on ``mesh`` (:mod:`gptoss_jax.sharding`'s rules)."""
    state = nnx.state(abstract_model(config, kernels="xla"), nnx.Param)
    return {_path_name(path): sharding.get_value()
            for path, sharding in nnx.to_flat_state(sharding_rules.parameter_shardings(state, mesh))}


def _path_name(path: tuple[Any, ...]) -> str:
    return ".".join(map(str, path))


def parameter_specs(config: GptOssConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Every parameter path -> the shape and dtype the model holds it in (independent of compute dtype)."""
    state = nnx.state(abstract_model(config, kernels="xla"), nnx.Param)
    return {_path_name(path): variable.get_value() for path, variable in nnx.to_flat_state(state)}


class SliceableParameter(Protocol):
    """A host parameter that reads (from disk, say) only the part it is indexed with."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray: ...

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray: ...


def build_model(
    config: GptOssConfig,
    parameters: Iterable[tuple[str, np.ndarray | jax.Array | SliceableParameter]],
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    kernels: KernelChoice = "auto",
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> GptOss:
    """A model whose parameters come from a stream of ``(parameter path, array)`` pairs.

    Each array goes to its devices (``shardings[path]``, else the mesh's partition rules, else
    the default device) as it arrives, so a streaming source keeps at most one tensor on the
    host. Of a host array (or a :class:`SliceableParameter`, which reads only what it is
    indexed with) only this process's shards are taken, each once. The stream must hold every
    parameter exactly once, in the model's shapes and dtypes. ``progress`` draws a progress bar
    on stderr when it is a terminal.
    """
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype, kernels=kernels, mesh=mesh))
    variables = {_path_name(path): variable for path, variable in nnx.to_flat_state(state)}
    if mesh is not None:
        shardings = {**parameter_shardings(config, mesh), **(shardings or {})}
    total_bytes = sum(_nbytes(variable.get_value()) for variable in variables.values())
    filled: set[str] = set()
    with ProgressBar("loading", len(variables), total_bytes, enabled=progress) as bar:
        for path, array in parameters:
            variable = variables.get(path)
            if variable is None or path in filled:
                raise CheckpointError(f"unexpected or repeated parameter {path!r}")
            expected = variable.get_value()
            if tuple(array.shape) != expected.shape or array.dtype != expected.dtype:
                raise CheckpointError(
                    f"parameter {path!r}: expected {expected.dtype}{list(expected.shape)}, "
                    f"got {array.dtype}{list(array.shape)}"
                )
            sharding = shardings.get(path) if shardings is not None else None
            variable.set_value(_place(array, sharding))
            filled.add(path)
            bar.advance(_nbytes(expected))
    missing = [path for path in variables if path not in filled]
    if missing:
        raise CheckpointError(f"missing parameters {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return nnx.merge(graphdef, state)


def _nbytes(spec: jax.ShapeDtypeStruct) -> int:
    return spec.size * spec.dtype.itemsize


def _place(
    array: np.ndarray | jax.Array | SliceableParameter, sharding: jax.sharding.Sharding | None
) -> jax.Array:
    if isinstance(array, jax.Array):
        return jax.device_put(array, sharding)
    if sharding is None:
        return jax.device_put(np.asarray(array))
    # Slices for this process's devices only: device_put would need every device of a
    # multi-process sharding to be addressable, and a SliceableParameter reads no more than
    # them. Devices that hold the same slice (replicas) share one read.
    shards: dict[tuple[tuple[int | None, ...], ...], np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((part.start, part.stop, part.step) for part in index)
        if key not in shards:
            shards[key] = np.asarray(array[index])
        return shards[key]

    return jax.make_array_from_callback(array.shape, sharding, shard)

