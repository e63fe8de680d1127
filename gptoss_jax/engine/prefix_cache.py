"""The prefix cache: prompt KV kept in blocks in a device pool, found again by a hash chain.

A block is ``block_tokens`` consecutive positions starting at a multiple of ``block_tokens``
(128 by default: gpt-oss's sliding window). It holds, for every layer, what a slot's cache holds
of those positions once the slot has just computed the block's last token:

* a full-attention layer: the block's keys and values, ``[block_tokens, Hkv, D]``;
* a sliding-window layer: its ring as it then is, ``[window, Hkv, D]``: the keys and values of
  the block's last ``window`` positions (ring slot ``r`` holds position ``end - window + r``, as
  ``block_tokens`` is a multiple of the window). That is exactly the ring a prefix ending at the
  block's end needs, and all of it: no later query sees further back.

A finished request's slot holds its prompt and its generated tokens but the last, with its rings
at that end ``q``: its blocks go to the pool too (those whose rings moved on during decoding as
*interior* blocks, never the last of a restored prefix), and ``[last block end, q)`` as a *tail*
(see :class:`PrefixIndex`) whose rings are those at ``q``.

So restoring a prefix of ``p`` tokens (``p`` a block end, or one less, or a tail's end) into a
slot's contiguous rows copies its blocks' full-layer entries and its last block's (or tail's)
rings, and marks every other
position empty: the slot then holds what a prefill of those ``p`` tokens would have left, no
kernel change needed. (At a block end less one, the ring entry of position ``p - window`` is
left empty: no query at ``p`` or later sees it, and the write of position ``p`` takes its slot.) Per hit that reads and writes ``p`` positions of each full layer plus one
ring per sliding layer: ``2 * (full_layers * p + sliding_layers * window) * 2 * Hkv * D *
itemsize`` bytes of HBM (28 MB read + 28 MB written for a 1,024-token hit at gpt-oss-20b's
shapes in bfloat16, about 17 us at 3.35 TB/s).

The index is a hash chain: a block's key digests its parent's key and its own tokens, so equal
keys mean equal tokens at equal positions. Blocks are evicted least recently used first; a hit
touches its blocks from the last to the first, so a chain's first blocks, which every later
block needs, are the last to go. A pinned block (being copied into a slot) is never evicted.

On a mesh the pool is split over ``tensor`` like the cache's heads and copied on every ``data``
shard, so a block restores into a slot on any shard.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gptoss_jax.config import GptOssConfig
from gptoss_jax.kv_cache import KVCache, LayerCache
from gptoss_jax.sharding import HEADS, named_sharding
from pallas_kernels.attention_reference import EMPTY_SLOT

DEFAULT_BLOCK_TOKENS = 128
POOL_SHARE = 0.5
"""The default pool's share of the device memory left after the parameters and the slots' cache."""
MAX_BLOCKS_PER_SLOT_CONTEXT = 4
"""The default pool holds at most this many slots' worth of full contexts (a cap for hosts whose
"device memory" is the machine's RAM)."""


class BlockPool(NamedTuple):
    """The pool's arrays, one ``(keys, values)`` pair per layer: ``[blocks, block_tokens or window, Hkv, D]``."""

    layers: tuple[tuple[jax.Array, jax.Array], ...]


def block_bytes(config: GptOssConfig, block_tokens: int, dtype: jnp.dtype, mesh: Mesh | None = None) -> int:
    """Bytes one block takes on one device (heads split over ``tensor``)."""
    heads = config.num_key_value_heads // (1 if mesh is None else mesh.shape["tensor"])
    per_position = 2 * heads * config.head_dim * jnp.dtype(dtype).itemsize
    return sum((config.sliding_window if config.is_sliding(layer) else block_tokens) * per_position
               for layer in range(config.num_hidden_layers))


def create_pool(config: GptOssConfig, blocks: int, block_tokens: int, dtype: jnp.dtype,
                mesh: Mesh | None = None) -> BlockPool:
    sharding = None if mesh is None else named_sharding(mesh, None, None, HEADS, None)
    layers = []
    for layer in range(config.num_hidden_layers):
        width = config.sliding_window if config.is_sliding(layer) else block_tokens
        shape = (blocks, width, config.num_key_value_heads, config.head_dim)
        layers.append((jnp.zeros(shape, dtype, device=sharding), jnp.zeros(shape, dtype, device=sharding)))
    return BlockPool(tuple(layers))


# --- device programs (the engine compiles them by shape) ------------------------------------------

def sliding_layers(cache: KVCache) -> list[bool]:
    """Which layers are sliding ones: those whose cache holds fewer positions than the full layers'
    (the engine keeps the prefix cache off unless its context exceeds a block, at least a window)."""
    return [layer.slots < cache.max_length for layer in cache.layers]


def _block_tokens(pool: BlockPool, sliding: Sequence[bool]) -> int:
    return next(keys.shape[1] for (keys, _), ring in zip(pool.layers, sliding) if not ring)


def restore_prefix(cache: KVCache, pool: BlockPool, slot: jax.Array, block_ids: jax.Array,
                   length: jax.Array, ring_end: jax.Array) -> KVCache:
    """Put the first ``length`` positions of a prefix into slot ``slot``; every other position is emptied.

    Args:
      slot: int32 scalar.
      block_ids: int32 ``[blocks]``: the prefix's pool blocks in order, padded with any id (a
        bucket of block counts).
      length: int32 scalar (traced): the positions restored.
      ring_end: int32 scalar (traced): where the sliding rings of the block holding position
        ``ring_end - 1`` end: a block end (``length`` is that or one less) or a tail's end
        (``length`` equals it).
    """
    sliding = sliding_layers(cache)
    block_tokens = _block_tokens(pool, sliding)
    layers = []
    for layer, ring, (pool_keys, pool_values) in zip(cache.layers, sliding, pool.layers):
        if ring:
            # Ring slot r holds the position congruent to r below ring_end (negative: none yet).
            held = ring_end - 1 - (ring_end - 1 - jnp.arange(layer.slots)) % layer.slots
            ring_block = block_ids[(ring_end - 1) // block_tokens]
            keys, values = pool_keys[ring_block], pool_values[ring_block]
        else:
            held = jnp.arange(layer.slots)
            keys = pool_keys[block_ids].reshape(-1, *pool_keys.shape[2:])
            values = pool_values[block_ids].reshape(-1, *pool_values.shape[2:])
        start = (slot, 0, 0, 0)
        layers.append(LayerCache(jax.lax.dynamic_update_slice(layer.keys, keys[None].astype(layer.keys.dtype), start),
                                 jax.lax.dynamic_update_slice(layer.values, values[None].astype(layer.values.dtype),
                                                              start),
                                 layer.positions.at[slot].set(jnp.where((held >= 0) & (held < length), held,
                                                                        EMPTY_SLOT))))
    return KVCache(tuple(layers))


def save_blocks(cache: KVCache, pool: BlockPool, slots: jax.Array, starts: jax.Array, block_ids: jax.Array, *,
                sliding: Sequence[bool] | None = None) -> BlockPool:
    """Copy each row's block (its full layers' positions from ``start``, its rings at the block's end) into the pool.

    Args:
      cache: the engine's cache, or a prefill call's rows.
      slots, starts, block_ids: int32 ``[rows]``: the row of ``cache``, the block's first position
        and the pool block to write; a block id past the pool's last is padding (dropped). A ring
        of one window is copied as it is: it is the block's where the row ends at the block's end
        (a block just prefilled, or a tail, whose ``start`` is its block's); an interior block's
        is not, and the index never restores it. A longer ring (a prefill call's, widened) gives
        the window before the block's end.
      sliding: which layers are sliding ones (None: :func:`sliding_layers`; a widened ring may
        be as long as the full layers).
    """
    if sliding is None:
        sliding = sliding_layers(cache)
    block_tokens = _block_tokens(pool, sliding)
    layers = []
    for layer, ring, (pool_keys, pool_values) in zip(cache.layers, sliding, pool.layers):
        rows = jnp.minimum(slots, layer.keys.shape[0] - 1)[:, None]
        if ring:
            # Pool entry i holds the position congruent to i below the block's end (a multiple of
            # the window); in a ring of one window that is slot i itself.
            window = pool_keys.shape[1]
            positions = (starts[:, None] + block_tokens - window + jnp.arange(window)) % layer.slots
        else:
            positions = starts[:, None] + jnp.arange(pool_keys.shape[1])
        keys, values = layer.keys[rows, positions], layer.values[rows, positions]
        layers.append((pool_keys.at[block_ids].set(keys.astype(pool_keys.dtype), mode="drop"),
                       pool_values.at[block_ids].set(values.astype(pool_values.dtype), mode="drop")))
    return BlockPool(tuple(layers))


def copy_rows(cache: KVCache, sources: jax.Array, targets: jax.Array) -> KVCache:
    """Copy whole slots (``sources`` -> ``targets``, int32 ``[rows]``; a target past the last slot is padding)."""
    return jax.tree.map(lambda array: array.at[targets].set(jnp.take(array, sources, axis=0, mode="clip"),
                                                            mode="drop"), cache)


# --- the index (host) ------------------------------------------------------------------------------

def _digest(parent: bytes, tokens: np.ndarray, kind: bytes = b"") -> bytes:
    return hashlib.blake2b(parent + kind + tokens.astype(np.int32).tobytes(), digest_size=16).digest()


def block_digests(tokens: np.ndarray, block_tokens: int) -> list[bytes]:
    """The hash chain of a sequence's whole blocks: digest i covers tokens ``[0, (i + 1) * block_tokens)``."""
    digests, parent = [], b""
    for start in range(0, tokens.size - block_tokens + 1, block_tokens):
        parent = _digest(parent, tokens[start:start + block_tokens])
        digests.append(parent)
    return digests


class Hit(NamedTuple):
    """A cached prefix: ``blocks`` (pool ids, in order) restore ``length`` positions, rings ending at ``ring_end``."""

    blocks: list[int]
    length: int
    ring_end: int


class PrefixIndex:
    """Which pool block holds which chain digest; least recently used eviction; pins.

    Three kinds of entries share the pool and its LRU order:

    * a block computed by a prefill chunk (kept with its rings as they were at its end, though
      the chunk went on: see :func:`gptoss_jax.engine.programs.prefill_chunk`): all its layers
      are valid;
    * an interior block, saved from a finished request's cache (where the rings had moved on):
      only its full layers are valid, so a restored prefix never ends on one;
    * a tail, saved from a finished request's cache of ``q`` positions: the full layers of
      ``[b, q)`` (``b`` the last block end at or before ``q``) and the rings at ``q``. It is keyed
      by its parent block's digest (``b""`` at 0) and its tokens, and a prefix may end on it when
      the new prompt continues with all its tokens.

    Not thread-safe: the engine's thread owns it (the server reads its counters only).
    """

    def __init__(self, blocks: int):
        self.capacity = blocks
        self._blocks: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # oldest use first
        self._free = list(range(blocks - 1, -1, -1))
        self._pins: collections.Counter[int] = collections.Counter()
        self._interior: set[bytes] = set()
        self._tails: dict[bytes, dict[bytes, np.ndarray]] = collections.defaultdict(dict)  # parent -> tail -> tokens
        self._tail_parents: dict[bytes, bytes] = {}

    @property
    def used(self) -> int:
        """Blocks holding a prefix."""
        return len(self._blocks)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._blocks

    def blocks(self, digests: Sequence[bytes]) -> list[int]:
        """The pool ids of those of ``digests`` cached."""
        return [self._blocks[digest] for digest in digests if digest in self._blocks]

    def complete(self, digest: bytes) -> bool:
        """Whether ``digest``'s block is cached with its rings (not an interior block)."""
        return digest in self._blocks and digest not in self._interior

    def longest_prefix(self, digests: Sequence[bytes], prompt: np.ndarray, block_tokens: int) -> Hit | None:
        """The longest cached prefix of ``prompt`` (``digests``: its block chain) leaving a token to compute.

        It ends on a complete block, or on a tail whose tokens all follow in ``prompt``. Marks its
        entries used; None: nothing cached.
        """
        chain = []
        for digest in digests:
            if digest not in self._blocks:
                break
            chain.append(digest)
        for count in range(len(chain), -1, -1):
            end = count * block_tokens
            parent = chain[count - 1] if count else b""
            rest = prompt[end:]
            tail = max(((digest, tokens.size) for digest, tokens in self._tails.get(parent, {}).items()
                        if tokens.size < rest.size and np.array_equal(rest[:tokens.size], tokens)),
                       key=lambda found: found[1], default=None)
            if tail is not None:
                used = chain[:count] + [tail[0]]
                hit = Hit([self._blocks[digest] for digest in used], end + tail[1], end + tail[1])
            elif count and self.complete(parent):
                used = chain[:count]
                hit = Hit([self._blocks[digest] for digest in used], min(end, prompt.size - 1), end)
            else:
                continue
            self.touch(used)
            return hit
        return None

    def touch(self, digests: Sequence[bytes]) -> None:
        """Mark a chain's cached blocks used, its head last: a chain is evicted from its tail."""
        for digest in reversed(digests):
            if digest in self._blocks:
                self._blocks.move_to_end(digest)

    def pin(self, blocks: Sequence[int]) -> None:
        self._pins.update(blocks)

    def unpin(self, blocks: Sequence[int]) -> None:
        self._pins.subtract(blocks)
        self._pins += collections.Counter()  # drop the zeros

    def allocate(self, digest: bytes, interior: bool = False) -> int | None:
        """A pool block for ``digest`` (the least recently used unpinned one if none is free), now indexed.

        An interior block's digest allocated again as a complete block keeps its pool block (to be
        written again). None when every block is pinned.
        """
        if digest in self._blocks:
            self._interior.discard(digest)
            return self._blocks[digest]
        if self._free:
            block = self._free.pop()
        else:
            victim = next((old for old, block in self._blocks.items() if not self._pins[block]), None)
            if victim is None:
                return None
            block = self._blocks.pop(victim)
            self._interior.discard(victim)
            if victim in self._tail_parents:
                parent = self._tail_parents.pop(victim)
                del self._tails[parent][victim]
                if not self._tails[parent]:
                    del self._tails[parent]
        self._blocks[digest] = block
        if interior:
            self._interior.add(digest)
        return block

    def allocate_tail(self, parent: bytes, tokens: np.ndarray) -> int | None:
        """A pool block for the tail ``tokens`` after ``parent``'s block; None if cached already or all pinned."""
        digest = _digest(parent, tokens, b"tail")
        if digest in self._blocks:
            self.touch([digest])
            return None
        block = self.allocate(digest)
        if block is not None:
            self._tails[parent][digest] = tokens.copy()
            self._tail_parents[digest] = parent
        return block
