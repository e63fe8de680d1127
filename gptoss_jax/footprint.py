"""What a model takes in device memory, from shapes alone, and what a device has.

Parameter bytes come from the model built abstractly (``abstract_model``): nothing is allocated
and no weights are read, so a checkpoint's ``config.json`` is enough, on any machine. On a mesh,
each parameter's shard is its shape divided by the mesh axes its partition spec names
(:mod:`gptoss_jax.sharding`). The KV cache's bytes are :func:`gptoss_jax.kv_cache.cache_bytes`.

A device's memory is what its allocator reports (``device.memory_stats()``, on GPUs); the CPU
keeps no such figures, so there a device is its share of the machine's RAM.
"""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.checkpoints.parameters import abstract_model
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kv_cache import cache_bytes
from gptoss_jax.sharding import partition_spec

# The share of a device's memory the parameters and the KV cache may take; the rest is for the
# programs' temporaries.
MEMORY_FRACTION = 0.9
_MEMINFO = "/proc/meminfo"


@functools.cache
def _abstract_parameters(config: GptOssConfig) -> list[tuple[tuple, nnx.Variable]]:
    return nnx.to_flat_state(nnx.state(abstract_model(config, kernels="xla"), nnx.Param))


def parameter_bytes(config: GptOssConfig) -> dict[str, int]:
    """Bytes of each kind of parameter: MXFP4 experts, expert biases, embeddings, the rest.

    Parameters keep the checkpoint's dtypes whatever the compute dtype, so these are the bytes
    on the devices of any run.
    """
    totals: dict[str, int] = defaultdict(int)
    for path, variable in _abstract_parameters(config):
        leaf = variable.get_value()
        size = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        key = ".".join(map(str, path))
        if key.endswith((".blocks", ".scales")):
            totals["experts (MXFP4 blocks + scales)"] += size
        elif key.endswith(("mlp1_bias", "mlp2_bias")):
            totals["expert biases (bf16)"] += size
        elif key.startswith(("embedding", "unembedding")):
            totals["embedding + unembedding (bf16)"] += size
        else:
            totals["attention, router, norms"] += size
    return dict(totals)


def per_device_parameter_bytes(config: GptOssConfig, mesh_shape: Mapping[str, int] | None = None) -> int:
    """Parameter bytes one device holds on a mesh of these axis sizes (the largest shard, if uneven).

    ``mesh_shape``: ``{"data": 1, "expert": 4, "tensor": 2}``; None: one device holds them all.
    """
    total = 0
    for _, variable in _abstract_parameters(config):
        leaf = variable.get_value()
        shard_shape = list(leaf.shape)
        if mesh_shape is not None:
            spec = partition_spec(*variable.get_metadata().get("out_sharding", ()))
            for dim, mesh_axes in enumerate(spec):
                mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ()
                shard_shape[dim] = -(-shard_shape[dim] // math.prod(mesh_shape[axis] for axis in mesh_axes))
        total += math.prod(shard_shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _ram_available_bytes() -> int | None:
    """The RAM the kernel could give without swapping (``MemAvailable``); None where it does not say."""
    try:
        with open(_MEMINFO) as meminfo:
            for line in meminfo:
                name, _, value = line.partition(":")
                if name == "MemAvailable":
                    return int(value.split()[0]) * 1024  # kB
    except OSError:
        pass
    return None


def _allocator_stats(device: jax.Device) -> dict | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats if stats and stats.get("bytes_limit") else None


def device_memory_bytes(device: jax.Device) -> int:
    """What one device can hold: its allocator's limit, or on the CPU its share of the RAM."""
    stats = _allocator_stats(device)
    if stats is not None:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, jax.local_device_count())


def device_free_bytes(device: jax.Device) -> int | None:
    """What one device can still take: its allocator's limit less what is in use, or on the CPU its
    share of the RAM available (``MemAvailable``); None where neither is known."""
    stats = _allocator_stats(device)
    if stats is not None:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    available = _ram_available_bytes()
    return None if available is None else available // max(1, jax.local_device_count())


def largest_context(config: GptOssConfig, room_bytes: float, dtype: jnp.dtype = jnp.bfloat16,
                    mesh: jax.sharding.Mesh | None = None) -> int:
    """The most positions a batch-1 KV cache of ``dtype`` holds within ``room_bytes`` per device.

    0 when not even one position fits; at most the model's context (``max_position_embeddings``).
    """
    low, high = 0, config.max_position_embeddings  # cache_bytes grows with the length
    while low < high:
        middle = (low + high + 1) // 2
        if cache_bytes(config, 1, middle, dtype, mesh) <= room_bytes:
            low = middle
        else:
            high = middle - 1
    return low
