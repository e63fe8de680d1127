"""The KV cache: keys (after RoPE) and values of every layer, addressed by absolute position.

Full-attention layers hold ``max_length`` slots, one per position. Sliding-window layers hold a
ring of ``sliding_window`` slots (128 in gpt-oss): a key at position p lives in slot
``p % window`` and is overwritten once it has left every later query's window, so these layers'
memory does not grow with the context. Each slot records the position it holds
(:data:`EMPTY_SLOT` when none), which is all attention needs to mask it.

On a mesh the cache is split like the attention that reads it: rows over ``data``, KV heads over
``tensor`` (:mod:`gptoss_jax.sharding`), so each device holds only its heads' keys and values.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gptoss_jax.config import GptOssConfig
from gptoss_jax.sharding import BATCH, HEADS, named_sharding
from pallas_kernels.attention_reference import EMPTY_SLOT


class LayerCache(NamedTuple):
    """One layer's cache: ``keys, values [B, slots, Hkv, D]`` and ``positions int32 [B, slots]``."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array

    @property
    def slots(self) -> int:
        return self.positions.shape[1]

    def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> LayerCache:
        """Store new ``keys, values [B, T, Hkv, D]`` at ``positions [B, T]`` (negative: padding).

        When a chunk is longer than a ring, only each sequence's last ``slots`` tokens are
        written, so no two tokens of a chunk land in the same slot.
        """
        newest = jnp.max(positions, axis=1, keepdims=True)
        kept = (positions >= 0) & (positions > newest - self.slots)
        slot = jnp.where(kept, positions % self.slots, self.slots)  # out of range: dropped
        batch_index = jnp.arange(positions.shape[0])[:, None]
        return LayerCache(
            self.keys.at[batch_index, slot].set(keys.astype(self.keys.dtype), mode="drop"),
            self.values.at[batch_index, slot].set(values.astype(self.values.dtype), mode="drop"),
            self.positions.at[batch_index, slot].set(positions, mode="drop"),
        )


    def resized(self, slots: int) -> LayerCache:
        """The same ring with ``slots`` slots: the newest ``slots`` positions it holds (all of them
        when it grows), each at ``p % slots``."""
        batch, _, heads, head_dim = self.keys.shape
        empty = LayerCache(jnp.zeros((batch, slots, heads, head_dim), self.keys.dtype),
                           jnp.zeros((batch, slots, heads, head_dim), self.values.dtype),
                           jnp.full((batch, slots), EMPTY_SLOT, jnp.int32))
        return empty.write(self.keys, self.values, self.positions)


class KVCache(NamedTuple):
    """Every layer's :class:`LayerCache`, in layer order."""

    layers: tuple[LayerCache, ...]

    @classmethod
    def create(
        cls, config: GptOssConfig, batch: int, max_length: int, dtype: jnp.dtype = jnp.bfloat16,
        mesh: Mesh | None = None,
    ) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_length`` positions, sharded over ``mesh`` if given."""
        _check_length(config, max_length)
        if mesh is None:
            heads_sharding = rows_sharding = None
        else:
            heads_sharding = named_sharding(mesh, BATCH, None, HEADS, None)
            rows_sharding = named_sharding(mesh, BATCH, None)
        layers = []
        for layer in range(config.num_hidden_layers):
            slots = _slots(config, layer, max_length)
            shape = (batch, slots, config.num_key_value_heads, config.head_dim)
            layers.append(LayerCache(
                jnp.zeros(shape, dtype, device=heads_sharding), jnp.zeros(shape, dtype, device=heads_sharding),
                jnp.full((batch, slots), EMPTY_SLOT, jnp.int32, device=rows_sharding),
            ))
        return cls(tuple(layers))

    @property
    def max_length(self) -> int:
        """The most positions it holds: the slots of a full-attention layer."""
        return max(layer.slots for layer in self.layers)

    def extended(self, config: GptOssConfig, max_length: int) -> KVCache:
        """The same cache with room for ``max_length`` positions: new slots are empty.

        A ring smaller than its window (a cache shorter than the window) has never wrapped, so
        its keys sit in the slots they keep in the longer ring.
        """
        _check_length(config, max_length)
        layers = []
        for index, layer in enumerate(self.layers):
            extra = _slots(config, index, max_length) - layer.slots
            padding = ((0, 0), (0, extra), (0, 0), (0, 0))
            layers.append(LayerCache(
                jnp.pad(layer.keys, padding), jnp.pad(layer.values, padding),
                jnp.pad(layer.positions, padding[:2], constant_values=EMPTY_SLOT),
            ))
        return KVCache(tuple(layers))


def _slots(config: GptOssConfig, layer: int, max_length: int) -> int:
    return min(config.sliding_window, max_length) if config.is_sliding(layer) else max_length


def _check_length(config: GptOssConfig, max_length: int) -> None:
    if max_length > config.max_position_embeddings:
        raise ValueError(f"max_length {max_length} exceeds the model's context of {config.max_position_embeddings}")


def cache_bytes(config: GptOssConfig, batch: int, max_length: int, dtype: jnp.dtype = jnp.bfloat16,
                mesh: Mesh | None = None) -> int:
    """Bytes one device holds of a :meth:`KVCache.create` cache: keys, values and slot positions.

    On a mesh, rows split over ``data`` and KV heads over ``tensor``, as the cache is placed.
    """
    rows, heads = batch, config.num_key_value_heads
    if mesh is not None:
        rows, heads = -(-batch // mesh.shape["data"]), heads // mesh.shape["tensor"]
    slots = sum(_slots(config, layer, max_length) for layer in range(config.num_hidden_layers))
    per_slot = 2 * heads * config.head_dim * jnp.dtype(dtype).itemsize + jnp.dtype(jnp.int32).itemsize
    return rows * slots * per_slot
