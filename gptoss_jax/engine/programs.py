"""The engine's device programs: a prompt chunk for a few rows, their first tokens, a decode burst.

Every program works on the engine's one KV cache of ``[slots, max_context]`` and takes each row's
state and settings as arrays, so requests come and go without recompiling. A row is addressed by
its slot index; a row that is not decoding feeds position -1, which the model neither caches nor
attends to, so it costs a row of compute and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import io_callback

from gptoss_jax.engine.prefix_cache import BlockPool, save_blocks, sliding_layers
from gptoss_jax.engine.requests import MAX_TOP_LOGPROBS
from gptoss_jax.kv_cache import KVCache
from gptoss_jax.sampling import RowSampling, sample_rows, top_logprobs
from pallas_kernels.attention_reference import EMPTY_SLOT

MAX_BURST = 64
"""The most decode steps one burst runs (its output buffer's width; the count itself is traced)."""


class Rows(NamedTuple):
    """The decoding state of slots, all ``[rows]``: what a burst reads and returns."""

    last_tokens: jax.Array  # int32: the newest token, not yet in the cache
    positions: jax.Array  # int32: its position
    active: jax.Array  # bool: decoding
    generated: jax.Array  # int32: tokens made so far (the next one's PRNG step)
    max_tokens: jax.Array  # int32
    stop_tokens: jax.Array  # int32 [slots, MAX_STOP_TOKENS + 1], -1 where unused (the engine's last column:
    # a token where a steered row pauses, to be steered again)


class TokenLogprobs(NamedTuple):
    """Per generated token: its log-probability and the top alternatives' ids and log-probabilities."""

    chosen: jax.Array  # float32 [..., steps]
    top_ids: jax.Array  # int32 [..., steps, MAX_TOP_LOGPROBS]
    top_values: jax.Array  # float32 [..., steps, MAX_TOP_LOGPROBS]


class RowMasks(NamedTuple):
    """Allowed-token bitmasks of a few rows of a batch: only the steered rows carry one, so a
    step applies ``k`` masks, not one per row (bit ``t % 32`` of word ``t // 32`` is token t)."""

    rows: jax.Array  # int32 [k]: the rows masked; the batch size (past the last row) is padding
    bits: jax.Array  # uint32 [k, V / 32]


class Burst(NamedTuple):
    """A burst's output: the cache and rows after it, and each step's tokens ``[rows, MAX_BURST]``."""

    cache: KVCache
    rows: Rows
    tokens: jax.Array  # int32
    valid: jax.Array  # bool: the row was decoding at that step
    logprobs: TokenLogprobs | None


class BlockSaves(NamedTuple):
    """The prefix-cache blocks a prefill call completes, to keep in the pool: all int32 ``[n]``."""

    rows: jax.Array  # the call's row that computes the block
    starts: jax.Array  # the block's first position
    blocks: jax.Array  # the pool block to write; past the pool's last: padding (dropped)


def prefill_chunk(graphdef, state, cache: KVCache, slots: jax.Array, tokens: jax.Array, positions: jax.Array,
                  last_index: jax.Array, pool: BlockPool | None = None, saves: BlockSaves | None = None, *,
                  first: bool) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, BlockPool]:
    """Run one prompt chunk of a few rows against their part of the cache.

    Args:
      cache: the engine's cache.
      slots: int32 ``[rows]`` slot indices; an index past the last slot is padding (its writes are
        dropped).
      tokens, positions: int32 ``[rows, chunk]`` (positions -1 after a prompt's end).
      last_index: int32 ``[rows]``: the chunk index whose logits to return.
      pool, saves: with the prefix cache, its pool and the blocks the chunks complete, each written
        with its full layers' keys and values and its sliding layers' rings as they are at the
        block's end. A ring of one window keeps only the chunk's end, so while the call runs its
        rows' rings are widened to a window plus the chunk (:meth:`LayerCache.resized`): a chunk
        may then span several blocks and every block it completes is kept whole.
      first: (static) the chunk is each row's first: their slots are emptied first, and
        attention stays within the chunk (the prefill kernel's case).

    Returns:
      (float32 logits ``[rows, V]``, the cache with the chunk written), and the pool after the
      saves when ``saves`` is given.
    """
    model = nnx.merge(graphdef, state)
    rows = _take_rows(cache, slots)
    if first:
        # A slot keeps its last request's keys; emptying the positions is what makes them unseen.
        rows = KVCache(tuple(layer._replace(positions=jnp.full_like(layer.positions, EMPTY_SLOT))
                             for layer in rows.layers))
    if saves is None:
        logits, rows = model.with_cache(tokens, positions, rows, last_index, cache_is_empty=first)
        return logits, _put_rows(cache, slots, rows)
    window = model.config.sliding_window
    sliding = sliding_layers(rows)
    rows = _rings_resized(rows, sliding, window + tokens.shape[1])
    logits, rows = model.with_cache(tokens, positions, rows, last_index, cache_is_empty=first)
    pool = save_blocks(rows, pool, saves.rows, saves.starts, saves.blocks, sliding=sliding)
    return logits, _put_rows(cache, slots, _rings_resized(rows, sliding, window)), pool


def _rings_resized(cache: KVCache, sliding: list[bool], slots: int) -> KVCache:
    return KVCache(tuple(layer.resized(slots) if ring else layer for layer, ring in zip(cache.layers, sliding)))


def allowed_tokens(masks: jax.Array, vocab: int) -> jax.Array:
    """bool ``[rows, vocab]`` from token bitmasks uint32 ``[rows, vocab / 32]`` (bit t % 32 of word t // 32)."""
    bits = (masks[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return bits.reshape(masks.shape[0], -1)[:, :vocab].astype(bool)


def _masked(logits: jax.Array, masks: RowMasks | None) -> jax.Array:
    """``logits [rows, V]`` with the tokens a row's mask leaves out at -inf (the log-probabilities stay the model's)."""
    if masks is None:
        return logits
    picked = jnp.take(logits, masks.rows, axis=0, mode="clip")
    kept = jnp.where(allowed_tokens(masks.bits, logits.shape[-1]), picked, -jnp.inf)
    return logits.at[masks.rows].set(kept, mode="drop")


def _logprobs(logits: jax.Array, tokens: jax.Array) -> TokenLogprobs:
    return TokenLogprobs(*top_logprobs(logits, tokens, min(MAX_TOP_LOGPROBS, logits.shape[-1])))


def first_tokens(logits: jax.Array, sampling: RowSampling, masks: RowMasks | None = None, *,
                 logprobs: bool) -> tuple[jax.Array, TokenLogprobs | None]:
    """Each row's first token from its prompt's last logits ``[rows, V]`` (PRNG step 0).

    ``masks``: the steered rows' allowed tokens, or None (every token allowed to every row).
    """
    tokens = sample_rows(_masked(logits, masks), jnp.zeros(logits.shape[:1], jnp.int32), sampling)
    return tokens, _logprobs(logits, tokens) if logprobs else None


def _take_rows(cache: KVCache, slots: jax.Array) -> KVCache:
    return jax.tree.map(lambda array: jnp.take(array, slots, axis=0, mode="clip"), cache)


def _put_rows(cache: KVCache, slots: jax.Array, rows: KVCache) -> KVCache:
    return jax.tree.map(lambda array, part: array.at[slots].set(part, mode="drop"), cache, rows)


def decode_burst(graphdef, state, cache: KVCache, slots: jax.Array, rows: Rows, sampling: RowSampling,
                 steps: jax.Array, masks: RowMasks | None = None, *, logprobs: bool,
                 next_masks: Callable | None = None) -> Burst:
    """Up to ``steps`` (traced, at most :data:`MAX_BURST`) decode steps of the rows in ``slots``.

    ``slots``: int32 ``[rows]``, the decoding slots (padded with an index past the last slot);
    ``rows`` and ``sampling`` are theirs. Only these rows are computed, so a burst costs what its
    live rows cost. A row stops at a stop token or at its ``max_tokens``, within the burst; the
    burst ends early when no row is decoding.

    ``masks``: the steered rows' allowed tokens at the first step, or None (every token allowed to
    every row). Without ``next_masks`` they apply at every step.

    ``next_masks``: (static) a host function, called at the start of each step with one int32
    array ``[1 + 2 * rows]`` (one, as each argument costs the host a conversion): the step's index,
    the tokens of the step before, and 1 where a row made one; it returns the
    bits of the step's masks for ``masks.rows`` (which must be given; at step 0 it returns
    ``masks.bits``). A row whose next allowed tokens depend on its last one is steered token by
    token this way, within a burst, so the rows beside it keep their multi-step bursts. The call
    depends on the step's input tokens only, not on its forward pass, so the host may compute the
    masks while the model runs. The last step's tokens reach the host with the burst's output.
    """
    model = nnx.merge(graphdef, state)
    batch = rows.last_tokens.shape[0]
    vocab = model.config.vocab_size
    out_tokens = jnp.zeros((batch, MAX_BURST), jnp.int32)
    out_valid = jnp.zeros((batch, MAX_BURST), bool)
    if logprobs:
        shape = jax.eval_shape(_logprobs, jax.ShapeDtypeStruct((batch, vocab), jnp.float32),
                               jax.ShapeDtypeStruct((batch,), jnp.int32))
        out_logprobs = jax.tree.map(lambda s: jnp.zeros((s.shape[0], MAX_BURST, *s.shape[1:]), s.dtype), shape)
    else:
        out_logprobs = None

    def keep_going(carry) -> jax.Array:
        step, _, rows, *_ = carry
        return (step < steps) & jnp.any(rows.active)

    def one_step(carry):
        step, row_cache, rows, out_tokens, out_valid, out_logprobs = carry
        step_masks = masks
        if next_masks is not None:
            made = out_valid[:, jnp.maximum(step - 1, 0)] & (step > 0)
            handed = jnp.concatenate([step[None], rows.last_tokens, made.astype(jnp.int32)])
            bits = io_callback(next_masks, jax.ShapeDtypeStruct(masks.bits.shape, masks.bits.dtype), handed)
            step_masks = masks._replace(bits=bits)
        fed_positions = jnp.where(rows.active, rows.positions, -1)
        logits, row_cache = model.with_cache(rows.last_tokens[:, None], fed_positions[:, None], row_cache)
        logits = logits[:, 0]
        tokens = jnp.where(rows.active, sample_rows(_masked(logits, step_masks), rows.generated, sampling), 0)
        if logprobs:
            step_logprobs = _logprobs(logits, tokens)
            out_logprobs = jax.tree.map(lambda out, new: out.at[:, step].set(new), out_logprobs, step_logprobs)
        active = rows.active
        generated = rows.generated + active
        finished = jnp.any(tokens[:, None] == rows.stop_tokens, axis=-1) | (generated >= rows.max_tokens)
        rows = rows._replace(
            last_tokens=jnp.where(active, tokens, rows.last_tokens),
            positions=rows.positions + active,
            active=active & ~finished,
            generated=generated,
        )
        return (step + 1, row_cache, rows, out_tokens.at[:, step].set(tokens),
                out_valid.at[:, step].set(active), out_logprobs)

    carry = (jnp.int32(0), _take_rows(cache, slots), rows, out_tokens, out_valid, out_logprobs)
    _, row_cache, rows, out_tokens, out_valid, out_logprobs = jax.lax.while_loop(keep_going, one_step, carry)
    return Burst(_put_rows(cache, slots, row_cache), rows, out_tokens, out_valid, out_logprobs)
