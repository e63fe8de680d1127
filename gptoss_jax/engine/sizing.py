"""How much the engine holds on a device: its slots (KV cache rows) and its prefix cache's pool.

Both come from one device's memory: ``memory_fraction`` of it, less the parameters. The slots
take what the caller asks (checked) or as many as fit; the pool, unless sized by the caller,
takes :data:`~gptoss_jax.engine.prefix_cache.POOL_SHARE` of what the slots leave.
"""

from __future__ import annotations

import jax
from flax import nnx

from gptoss_jax.engine import prefix_cache
from gptoss_jax.errors import GptOssError
from gptoss_jax.footprint import device_memory_bytes
from gptoss_jax.kv_cache import cache_bytes
from gptoss_jax.model import GptOss

MAX_SLOTS = 1024
"""The most slots the engine chooses when it sizes itself from memory."""


class EngineSizeError(GptOssError):
    """Slots and context that do not fit beside the parameters; the message gives the figures."""


def parameter_bytes_per_device(model: GptOss) -> int:
    """Bytes of the model's arrays on its first device (shards of a mesh are even)."""
    total = 0
    for leaf in jax.tree.leaves(nnx.state(model)):
        if isinstance(leaf, jax.Array):
            total += leaf.addressable_shards[0].data.nbytes
    return total


def _data_shards(model: GptOss) -> int:
    return 1 if model.mesh is None else model.mesh.shape["data"]


def slots_that_fit(model: GptOss, max_context: int, max_batch: int | None, memory_fraction: float) -> int:
    """``max_batch`` checked against the memory, or (None) the most slots that fit, a multiple of ``data``."""
    config, data = model.config, _data_shards(model)
    parameters = parameter_bytes_per_device(model)
    available = memory_fraction * device_memory_bytes(jax.local_devices()[0])
    per_row = cache_bytes(config, data, max_context, model.dtype, model.mesh) / data
    if max_batch is None:
        fitting = int((available - parameters) // per_row) if available > parameters else 0
        max_batch = min(MAX_SLOTS, fitting - fitting % data)
        if max_batch < data:
            raise EngineSizeError(
                f"no KV cache of {max_context} positions fits beside the parameters "
                f"({parameters / 1e9:.2f} GB) in {memory_fraction:.0%} of the device's "
                f"{available / memory_fraction / 1e9:.1f} GB; lower max_context")
        return max_batch
    if max_batch < 1 or max_batch % data:
        raise EngineSizeError(f"max_batch must be a positive multiple of the mesh's data axis ({data}), "
                              f"got {max_batch}")
    cache = cache_bytes(config, max_batch, max_context, model.dtype, model.mesh)
    if parameters + cache > available:
        raise EngineSizeError(
            f"a KV cache of {max_batch} rows x {max_context} positions takes {cache / 1e9:.2f} GB per "
            f"device; with the parameters ({parameters / 1e9:.2f} GB) that is over {memory_fraction:.0%} "
            f"of the device's {available / memory_fraction / 1e9:.1f} GB; lower max_batch or max_context")
    return max_batch


def pool_blocks(model: GptOss, max_batch: int, max_context: int, block_tokens: int, pool_bytes: int | None,
                memory_fraction: float) -> int:
    """Blocks of the prefix cache's pool: ``pool_bytes`` per device, or by default
    :data:`~gptoss_jax.engine.prefix_cache.POOL_SHARE` of the memory the parameters and the slots leave, at
    most :data:`~gptoss_jax.engine.prefix_cache.MAX_BLOCKS_PER_SLOT_CONTEXT` slots' worth of context (at
    least one block)."""
    config = model.config
    per_block = prefix_cache.block_bytes(config, block_tokens, model.dtype, model.mesh)
    if pool_bytes is not None:
        if pool_bytes < per_block:
            raise EngineSizeError(f"prefix_cache_bytes ({pool_bytes}) holds no block of {per_block} bytes; "
                                  f"turn the prefix cache off instead")
        return pool_bytes // per_block
    left = (memory_fraction * device_memory_bytes(jax.local_devices()[0]) - parameter_bytes_per_device(model)
            - cache_bytes(config, max_batch, max_context, model.dtype, model.mesh))
    most = prefix_cache.MAX_BLOCKS_PER_SLOT_CONTEXT * max_batch * (max_context // block_tokens)
    return max(1, min(most, int(prefix_cache.POOL_SHARE * left) // per_block))
