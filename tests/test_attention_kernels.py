"""Prefill and decode attention kernels (Pallas Mosaic GPU).

The kernels are compared with a float64 NumPy reference written here, in interpret mode on the
CPU and, on a Hopper GPU, compiled (``kernel_mode``, see conftest.py). Interpret mode cannot
execute the compiled P @ V step (register-LHS WGMMA accumulating in place), so its runs use the
kernels' ``interpretable_pv`` variant, which differs only in that step; without a GPU the
compiled step is exercised by the CUDA lowering tests at gpt-oss shapes (Hq=64, Hkv=8, D=64),
which run the whole Mosaic GPU lowering for sm_90.
"""

from __future__ import annotations

import math
import re

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

# The race detector's verdict has no public accessor in jax 0.11.2.
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

from pallas_kernels.attention_reference import EMPTY_SLOT, KERNEL_ATOL, attention_reference, visible_keys
from pallas_kernels.decode_attention import (
    ASSUMED_CTAS_PER_SM,
    DEFAULT_SM_COUNT,
    DecodeAttentionConfig,
    Residency,
    ctas_per_sm,
    decode_attention,
    decode_tiling,
    device_sm_count,
    smem_bytes,
    visible_tile_ranges,
)
from pallas_kernels.flash_attention import FlashAttentionConfig, flash_attention, kv_block_range

SCALE = 0.125
MIXED_SINKS = [20.0, -20.0, 0.0, 3.0, -3.0, 8.0, -8.0, 1.0]
RACE_CHECKED = plgpu.InterpretGPUParams(detect_races=True)


def reference_f64(q, k, v, sinks, q_positions, kv_positions, window):
    """float64 attention with sinks, straight from the definition (no running max)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) * SCALE
    qp = np.asarray(q_positions)[:, None, :, None]
    kp = np.asarray(kv_positions)[:, None, None, :]
    visible = (kp >= 0) & (kp <= qp)
    if window is not None:
        visible &= kp > qp - window
    sink = np.asarray(sinks, np.float64)[None, :, None, None]
    top = np.maximum(np.where(visible, scores, -np.inf).max(-1, keepdims=True), sink)
    weights = np.where(visible, np.exp(scores - top), 0.0)
    weights /= weights.sum(-1, keepdims=True) + np.exp(sink - top)
    return np.einsum("bhts,bshd->bthd", weights, v)


def random_qkv(key, batch, q_len, kv_len, q_heads, kv_heads):
    kq, kk, kv = jax.random.split(jax.random.key(key), 3)
    q = jax.random.normal(kq, (batch, q_len, q_heads, 64), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, 64), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, 64), jnp.bfloat16)
    return q, k, v


def as_f32(x):
    return np.asarray(x.astype(jnp.float32))


def interpret_arg(kernel_mode: str, race_checked: bool = False):
    """The kernels' ``interpret`` argument: interpret mode (with the race detector if asked) or
    compiled for the GPU."""
    if kernel_mode == "gpu":
        return False
    return RACE_CHECKED if race_checked else True


def assert_no_races(out, kernel_mode: str) -> None:
    """After a race-checked interpret-mode run: the detector found nothing."""
    if kernel_mode == "interpret":
        jax.block_until_ready(out)
        assert not gpu_callbacks.get_races().races_found


# ---------------------------------------------------------------------------------------------
# Prefill.


@pytest.mark.parametrize(
    "batch, seq_len, q_heads, kv_heads, window, block_q, block_kv, race_checked",
    [
        # Window edges: every query past 129 has keys at distance 127, 128 and 129; T is not a
        # multiple of either block; query blocks of 8 tokens straddle the window's start.
        (2, 300, 16, 2, 128, 8, 64, False),
        # Full causal, KV tile of 128, query block of 16 tokens.
        (1, 200, 8, 1, None, 16, 128, False),
        # Window shorter than one KV tile and close to the query block; TMA, barrier and
        # SMEM accesses checked for races.
        (1, 100, 8, 1, 20, 16, 64, True),
    ],
)
def test_prefill_matches_float64_reference(
    batch, seq_len, q_heads, kv_heads, window, block_q, block_kv, race_checked, kernel_mode
):
    q, k, v = random_qkv(0, batch, seq_len, seq_len, q_heads, kv_heads)
    sinks = jnp.asarray((MIXED_SINKS * 2)[:q_heads], jnp.bfloat16)
    config = FlashAttentionConfig(block_q=block_q, block_kv=block_kv)
    out = flash_attention(
        q, k, v, sinks, sliding_window=window, softmax_scale=SCALE, config=config,
        interpret=interpret_arg(kernel_mode, race_checked),
    )
    if race_checked:
        assert_no_races(out, kernel_mode)
    positions = np.broadcast_to(np.arange(seq_len), (batch, seq_len))
    expected = reference_f64(q, k, v, sinks, positions, positions, window)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(as_f32(out), expected, atol=KERNEL_ATOL, rtol=KERNEL_ATOL)
    # Heads with sink +20 put almost all weight on the sink: their output must vanish.
    assert np.abs(as_f32(out)[:, :, 0]).max() < 1e-3


def test_prefill_window_counts_keys_exactly(kernel_mode):
    """With equal scores, output = (visible keys per residue class) / (visible keys + 1).

    V[s, d] = [s % 64 == d], so a window of 128 keys gives 2/129 in every column, while 127 or
    129 keys leave one column at 1/128 or 3/130: an off-by-one at the window edge is far
    outside the tolerance.
    """
    seq_len, window = 270, 128
    q = jnp.zeros((1, seq_len, 8, 64), jnp.bfloat16)
    k = jnp.zeros((1, seq_len, 1, 64), jnp.bfloat16)
    v = jax.nn.one_hot(jnp.arange(seq_len) % 64, 64, dtype=jnp.bfloat16)[None, :, None, :]
    sinks = jnp.zeros((8,), jnp.bfloat16)
    out = flash_attention(
        q, k, v, sinks, sliding_window=window, softmax_scale=SCALE,
        config=FlashAttentionConfig(block_q=8, block_kv=64), interpret=interpret_arg(kernel_mode),
    )
    positions = np.arange(seq_len)[None]
    expected = reference_f64(q, k, v, sinks, positions, positions, window)
    np.testing.assert_allclose(as_f32(out), expected, atol=1e-3)
    np.testing.assert_allclose(as_f32(out)[0, window - 1 :], 2 / (window + 1), atol=1e-4)
    for wrong in (window - 1, window + 1):
        off_by_one = reference_f64(q, k, v, sinks, positions, positions, wrong)
        assert np.abs(off_by_one - expected).max() > 5e-3


@pytest.mark.parametrize("window", [128, None])
def test_prefill_walks_only_the_visible_kv_blocks(window):
    """At 128K tokens each query block's KV range covers its visible keys and, on sliding
    layers, spans at most ceil((block_q + window - 1) / block_kv) + 1 blocks."""
    seq_len, block_q, block_kv = 131072, 16, 64
    num_kv_blocks = seq_len // block_kv
    q_start = jnp.arange(0, seq_len, block_q, dtype=jnp.int32)
    q_end = jnp.minimum(q_start + block_q, seq_len)
    lo, hi = kv_block_range(q_start, q_end, num_kv_blocks, block_kv, window)
    lo, hi = np.broadcast_to(np.asarray(lo), q_start.shape), np.asarray(hi)
    first_key = np.maximum(np.asarray(q_start) - (window or seq_len) + 1, 0)
    assert (lo * block_kv <= first_key).all() and (hi * block_kv >= np.asarray(q_end)).all()
    assert (hi <= num_kv_blocks).all()
    if window is None:
        assert (lo == 0).all()
    else:
        assert (hi - lo).max() <= -(-(block_q + window - 1) // block_kv) + 1
        # Tight: the first walked block holds a visible key for the block's first query.
        assert ((lo + 1) * block_kv > first_key).all()


# ---------------------------------------------------------------------------------------------
# Decode, and prefill chunks against a cache.


def linear_cache_positions(lengths, cache_len):
    slots = np.arange(cache_len)[None]
    lengths = np.asarray(lengths)[:, None]
    return np.where(slots < lengths, slots, EMPTY_SLOT).astype(np.int32)


def ring_positions(lengths, ring):
    """Slot i of a ring holds the newest position p < length with p % ring == i."""
    newest = np.asarray(lengths)[:, None] - 1
    positions = newest - (newest - np.arange(ring)[None]) % ring
    return np.where(positions >= 0, positions, EMPTY_SLOT).astype(np.int32)


def chunk_positions(start, chunk, lengths):
    """Positions start..start+chunk-1 of each row, -1 past the row's length (right padding)."""
    columns = start + np.arange(chunk)[None]
    return np.where(columns < np.asarray(lengths)[:, None], columns, -1).astype(np.int32)


@pytest.mark.parametrize(
    "q_len, window, config",
    [
        (1, None, DecodeAttentionConfig(block_kv=64, num_splits=3)),
        (3, None, DecodeAttentionConfig(block_kv=64, num_splits=1)),
        (2, 100, DecodeAttentionConfig(block_kv=128, num_splits=2, max_concurrent_steps=2)),
    ],
)
def test_decode_ragged_batch_matches_float64_reference(q_len, window, config, kernel_mode):
    cache_len, lengths = 384, [7, 200, 384]
    q, k, v = random_qkv(1, len(lengths), q_len, cache_len, 16, 2)
    sinks = jnp.asarray(MIXED_SINKS * 2, jnp.bfloat16)
    kv_positions = linear_cache_positions(lengths, cache_len)
    # The newest q_len tokens are already in the cache (written before attention).
    q_positions = (np.asarray(lengths)[:, None] - q_len + np.arange(q_len)).astype(np.int32)
    out = decode_attention(
        q, k, v, sinks, q_positions, kv_positions, sliding_window=window, softmax_scale=SCALE,
        config=config, interpret=interpret_arg(kernel_mode),
    )
    expected = reference_f64(q, k, v, sinks, q_positions, kv_positions, window)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(as_f32(out), expected, atol=KERNEL_ATOL, rtol=KERNEL_ATOL)


def test_decode_with_one_split_merges_in_the_kernel_or_in_xla(kernel_mode):
    """One split: the kernel normalizes its rows itself (the default) or leaves float32 partials
    to the XLA merge; both against the reference, on a ragged batch with an empty row."""
    cache_len, lengths = 256, [0, 130, 256]
    q, k, v = random_qkv(5, len(lengths), 1, cache_len, 16, 2)
    sinks = jnp.asarray(MIXED_SINKS * 2, jnp.bfloat16)
    kv_positions = linear_cache_positions(lengths, cache_len)
    q_positions = (np.maximum(np.asarray(lengths), 1)[:, None] - 1).astype(np.int32)
    expected = reference_f64(q, k, v, sinks, q_positions, kv_positions, None)
    for merge in (True, False):
        config = DecodeAttentionConfig(block_kv=64, num_splits=1, merge_single_split=merge)
        assert decode_tiling(config, 3, 1, cache_len, 2, q_heads=16).merged_in_kernel == merge
        out = decode_attention(
            q, k, v, sinks, q_positions, kv_positions, sliding_window=None, softmax_scale=SCALE, config=config,
            interpret=interpret_arg(kernel_mode),
        )
        np.testing.assert_allclose(as_f32(out), expected, atol=KERNEL_ATOL, rtol=KERNEL_ATOL)
    assert not decode_tiling(DecodeAttentionConfig(num_splits=2), 3, 1, cache_len, 2, q_heads=16).merged_in_kernel


def test_decode_wrapped_ring_buffer(kernel_mode):
    """The sliding layers' 128-slot ring: slot i holds the newest position p with p % 128 == i."""
    ring, window = 128, 128
    lengths = np.array([1000, 300, 57])  # wrapped many times, wrapped once, not yet full
    kv_positions = ring_positions(lengths, ring)
    q, k, v = random_qkv(2, len(lengths), 1, ring, 16, 2)
    sinks = jnp.asarray(MIXED_SINKS[::-1] * 2, jnp.bfloat16)
    q_positions = (lengths[:, None] - 1).astype(np.int32)
    out = decode_attention(
        q, k, v, sinks, q_positions, kv_positions, sliding_window=window, softmax_scale=SCALE,
        config=DecodeAttentionConfig(block_kv=64), interpret=interpret_arg(kernel_mode, race_checked=True),
    )
    assert_no_races(out, kernel_mode)
    expected = reference_f64(q, k, v, sinks, q_positions, kv_positions, window)
    np.testing.assert_allclose(as_f32(out), expected, atol=KERNEL_ATOL, rtol=KERNEL_ATOL)


@pytest.mark.parametrize(
    "window, config",
    [
        (None, DecodeAttentionConfig(block_q=8, block_kv=64, num_splits=2)),
        (100, DecodeAttentionConfig(block_q=16, block_kv=128, num_splits=1)),
    ],
)
def test_prefill_chunk_against_a_linear_cache(window, config, kernel_mode):
    """A later prefill chunk of a full layer: the chunk is written to the cache first, then its
    40 queries (several query blocks, the last one partial) attend over the cache. Row 1 ends
    inside the chunk (right padding), row 2 ended before it (all padding, output zero)."""
    cache_len, start, chunk, lengths = 384, 150, 40, [190, 171, 120]
    q, k, v = random_qkv(3, len(lengths), chunk, cache_len, 16, 2)
    sinks = jnp.asarray(MIXED_SINKS * 2, jnp.bfloat16)
    kv_positions = linear_cache_positions(lengths, cache_len)
    q_positions = chunk_positions(start, chunk, lengths)
    out = decode_attention(
        q, k, v, sinks, q_positions, kv_positions, sliding_window=window, softmax_scale=SCALE,
        config=config, interpret=interpret_arg(kernel_mode),
    )
    expected = reference_f64(q, k, v, sinks, q_positions, kv_positions, window)
    np.testing.assert_allclose(as_f32(out), expected, atol=KERNEL_ATOL, rtol=KERNEL_ATOL)
    assert not as_f32(out)[2].any()


def test_prefill_chunk_against_a_ring_and_itself(kernel_mode):
    """A later prefill chunk of a sliding layer attends over the ring as it was, followed by
    the chunk's own keys: 176 slots, not a multiple of the tile, so padded. Races checked."""
    ring, window, chunk, start = 128, 128, 48, 300
    lengths = np.array([348, 330])
    ring_keys = ring_positions(np.full(2, start), ring)
    q_positions = chunk_positions(start, chunk, lengths)
    kv_positions = np.concatenate([ring_keys, q_positions], axis=1)
    q, k, v = random_qkv(4, 2, chunk, ring + chunk, 16, 2)
    sinks = jnp.asarray(MIXED_SINKS[::-1] * 2, jnp.bfloat16)
    out = decode_attention(
        q, k, v, sinks, q_positions, kv_positions, sliding_window=window, softmax_scale=SCALE,
        config=DecodeAttentionConfig(block_q=8, block_kv=64), interpret=interpret_arg(kernel_mode, race_checked=True),
    )
    assert_no_races(out, kernel_mode)
    expected = reference_f64(q, k, v, sinks, q_positions, kv_positions, window)
    np.testing.assert_allclose(as_f32(out), expected, atol=KERNEL_ATOL, rtol=KERNEL_ATOL)


# Each residency, with and without the real-rows partials and the short-cache split; 16 SMs, so
# that they ask for different splits of the 3 x 2 (sequence, KV head) pairs' four 128-slot tiles.
DECODE_VARIANTS = [
    DecodeAttentionConfig(residency=Residency.ASSUMED, split_short_caches=False, real_partial_rows=False,
                          sm_count=16),
    DecodeAttentionConfig(residency=Residency.ASSUMED, sm_count=16),
    DecodeAttentionConfig(residency=Residency.FITTED, sm_count=16),
    DecodeAttentionConfig(residency=Residency.DERIVED, sm_count=16),
    DecodeAttentionConfig(residency=Residency.DERIVED, sm_count=16, real_partial_rows=False),
]


def variant_id(config: DecodeAttentionConfig) -> str:
    return (f"{config.residency}{'-split' if config.split_short_caches else ''}"
            f"{'-real_rows' if config.real_partial_rows else ''}{'' if config.merge_single_split else '-xla_merge'}")


def test_decode_variants_tile_differently():
    """The variants below differ where they should: splits, stages, rows kept, ring tiles."""
    def tilings(config):
        return (decode_tiling(config, 3, 1, 512, 2, q_heads=16, interpretable_pv=True),
                decode_tiling(config, 3, 1, 128, 2, q_heads=16, interpretable_pv=True))

    assert len({tilings(c) for c in DECODE_VARIANTS}) == len(DECODE_VARIANTS)
    assert {t.num_splits for c in DECODE_VARIANTS for t in tilings(c)[:1]} == {2, 4}
    assert {t.stages for c in DECODE_VARIANTS for t in tilings(c)} == {2, 4}
    assert {t.block_kv for c in DECODE_VARIANTS for t in tilings(c)[1:]} == {64, 128}


@pytest.mark.parametrize("config", DECODE_VARIANTS, ids=variant_id)
def test_decode_variants_match_float64_reference(config, kernel_mode):
    """A decode step of every variant over a ragged linear cache (four 128-slot tiles, split) with
    races checked, and over the sliding layers' wrapped ring (one 128-slot tile, which the
    short-cache split cuts into two 64-slot ones)."""
    sinks = jnp.asarray(MIXED_SINKS * 2, jnp.bfloat16)
    q, k, v = random_qkv(7, 3, 1, 512, 16, 2)
    linear_lengths, ring_lengths = np.array([500, 300, 57]), np.array([1000, 300, 57])
    for lengths, kv_positions, window in (
        (linear_lengths, linear_cache_positions(linear_lengths, 512), None),
        (ring_lengths, ring_positions(ring_lengths, 128), 128),
    ):
        cache_len = kv_positions.shape[1]
        keys, values = k[:, :cache_len], v[:, :cache_len]
        q_positions = (lengths[:, None] - 1).astype(np.int32)
        out = decode_attention(
            q, keys, values, sinks, q_positions, kv_positions, sliding_window=window, softmax_scale=SCALE,
            config=config, interpret=interpret_arg(kernel_mode, race_checked=window is None),
        )
        if window is None:
            assert_no_races(out, kernel_mode)
        expected = reference_f64(q, keys, values, sinks, q_positions, kv_positions, window)
        np.testing.assert_allclose(as_f32(out), expected, atol=KERNEL_ATOL, rtol=KERNEL_ATOL)


def test_decode_tiling_at_gpt_oss_decode_shapes():
    """What each residency launches for one decode token (64 query heads, 8 KV heads) on 132 SMs."""
    def tiling(residency, batch, cache_len, **options):
        config = DecodeAttentionConfig(residency=residency, sm_count=DEFAULT_SM_COUNT, **options)
        return decode_tiling(config, batch, 1, cache_len, 8, q_heads=64)

    # 8 real rows (one token x 8 heads) of the 64-row WGMMA tile; the partials keep 8.
    full = tiling(Residency.DERIVED, 1, 32768)
    assert (full.rows, full.partial_rows) == (64, 8)
    assert tiling(Residency.DERIVED, 1, 32768, real_partial_rows=False).partial_rows == 64
    # 4 stages of 128-slot tiles need 161 KB: one CTA per SM, so 132 / 8 KV heads -> 17 splits
    # asked, 16 of 16 tiles each given work. ASSUMED asks for 2 per SM: 32 splits of 8 tiles.
    assert ctas_per_sm(smem_bytes(64, 128, 4)) == 1
    assert (full.num_splits, full.stages, full.block_kv) == (16, 4, 128)
    assumed = tiling(Residency.ASSUMED, 1, 32768)
    assert (assumed.num_splits, assumed.stages) == (32, 4)
    # FITTED caps the stages so that two CTAs fit (3 stages need 130 KB).
    fitted = tiling(Residency.FITTED, 1, 32768)
    assert (fitted.num_splits, fitted.stages) == (32, 2)
    assert ctas_per_sm(smem_bytes(64, 128, 2)) == ASSUMED_CTAS_PER_SM > ctas_per_sm(smem_bytes(64, 128, 3))
    # The sliding ring at batch 1: one 128-slot tile, cut in two, so 16 CTAs instead of 8.
    ring = tiling(Residency.DERIVED, 1, 128)
    assert (ring.block_kv, ring.num_tiles, ring.num_splits) == (64, 2, 2)
    unsplit = tiling(Residency.DERIVED, 1, 128, split_short_caches=False)
    assert (unsplit.block_kv, unsplit.num_splits) == (128, 1)
    # At batch 64 the 512 (sequence, KV head) pairs fill the GPU: no split, full tiles.
    assert tiling(Residency.DERIVED, 64, 128)[2:5] == (128, 1, 1)
    assert tiling(Residency.DERIVED, 64, 32768).num_splits == 1
    # The SM count scales the splits: an H100 PCIe's 114 SMs ask for cdiv(114, 8) = 15.
    pcie = decode_tiling(DecodeAttentionConfig(sm_count=114), 1, 1, 32768, 8, q_heads=64)
    assert pcie.num_splits == 15


def test_decode_sm_count_without_a_gpu_is_the_stated_default():
    if jax.devices()[0].platform == "gpu":
        assert device_sm_count() == jax.devices()[0].core_count
    else:
        assert device_sm_count() == DEFAULT_SM_COUNT == 132


def test_decode_smem_estimate_bounds_what_ptxas_reported():
    """kernel_sass's launched SMEM (jax 0.11.2, ptxas 13.0) for 128-slot tiles: 164905 B at 4
    stages, 98329 B at 2; 98345 B for 64-slot tiles at 4 stages. The estimate that picks the
    residency is an upper bound within 2 KB, so it never counts on a CTA that does not fit."""
    for (block_kv, stages), launched in {(128, 4): 164905, (128, 2): 98329, (64, 4): 98345}.items():
        assert launched <= smem_bytes(64, block_kv, stages) <= launched + 2048


@pytest.mark.parametrize("window", [128, None])
def test_decode_walks_only_from_the_first_to_the_last_visible_tile(window):
    """Every visible key lies in [lo, hi), and tiles lo and hi - 1 each hold a visible key: the
    range is exact at both ends (ring + chunk, linear cache, ragged rows, padding blocks)."""
    block_q, block_kv, chunk = 8, 64, 256
    lengths = np.array([700, 520, 300])
    ring = ring_positions(np.full(3, 448), 128)
    q_positions = chunk_positions(448, chunk, lengths)
    for kv_positions in (
        np.concatenate([ring, q_positions], axis=1),
        linear_cache_positions(lengths, 1024),
    ):
        lo, hi = map(np.asarray, visible_tile_ranges(
            jnp.asarray(q_positions), jnp.asarray(kv_positions), block_q, block_kv, window
        ))
        visible = np.asarray(visible_keys(jnp.asarray(q_positions), jnp.asarray(kv_positions), window))
        # [B, query blocks, tiles]: does any query of the block see a key of the tile?
        tiles = visible.reshape(3, -1, block_q, kv_positions.shape[1] // block_kv, block_kv).any(axis=(2, 4))
        assert tiles.any(axis=2).any()  # the test covers some visible tiles
        for b, block in np.ndindex(lo.shape):
            seen = np.flatnonzero(tiles[b, block])
            if seen.size:
                assert (lo[b, block], hi[b, block]) == (seen[0], seen[-1] + 1)
            else:
                assert lo[b, block] == hi[b, block] == 0


# ---------------------------------------------------------------------------------------------
# gpt-oss shapes (64 query heads, 8 KV heads, head_dim 64) and default configs, compiled.


@pytest.mark.parametrize("window", [128, None])
def test_gpt_oss_shapes_on_the_gpu(gpu, window):
    """What the model runs: a 1000-token prompt's first chunk (prefill kernel), a 256-token later
    chunk against the cache (decode kernel, query blocks), and a ragged decode step."""
    sinks = jnp.linspace(-6.0, 6.0, 64).astype(jnp.bfloat16)
    q, k, v = random_qkv(5, 1, 1000, 1000, 64, 8)
    out = flash_attention(q, k, v, sinks, sliding_window=window, softmax_scale=SCALE)
    positions = np.arange(1000)[None]
    expected = reference_f64(q, k, v, sinks, positions, positions, window)
    np.testing.assert_allclose(as_f32(out), expected, atol=KERNEL_ATOL, rtol=KERNEL_ATOL)

    cache_len, lengths = 2048, [1500, 1200, 1024, 2000]
    q, k, v = random_qkv(6, len(lengths), 256, cache_len, 64, 8)
    kv_positions = linear_cache_positions(lengths, cache_len)
    q_positions = chunk_positions(1000, 256, lengths)
    out = decode_attention(
        q, k, v, sinks, q_positions, kv_positions, sliding_window=window, softmax_scale=SCALE
    )
    expected = reference_f64(q, k, v, sinks, q_positions, kv_positions, window)
    np.testing.assert_allclose(as_f32(out), expected, atol=KERNEL_ATOL, rtol=KERNEL_ATOL)

    q_positions = (np.asarray(lengths)[:, None] - 1).astype(np.int32)
    out = decode_attention(
        q[:, :1], k, v, sinks, q_positions, kv_positions, sliding_window=window, softmax_scale=SCALE
    )
    expected = reference_f64(q[:, :1], k, v, sinks, q_positions, kv_positions, window)
    np.testing.assert_allclose(as_f32(out), expected, atol=KERNEL_ATOL, rtol=KERNEL_ATOL)


# ---------------------------------------------------------------------------------------------
# CUDA lowering at gpt-oss shapes (64 query heads, 8 KV heads, head_dim 64).

Q_HEADS, KV_HEADS, HEAD_DIM = 64, 8, 64


def export_prefill(seq_len, window):
    def f(q, k, v, sinks):
        return flash_attention(q, k, v, sinks, sliding_window=window, softmax_scale=SCALE)

    bf16 = jnp.bfloat16
    return jax.export.export(jax.jit(f), platforms=["cuda"])(
        jax.ShapeDtypeStruct((1, seq_len, Q_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((1, seq_len, KV_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((1, seq_len, KV_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((Q_HEADS,), bf16),
    )


@pytest.mark.parametrize("seq_len", [4096, 131072])
@pytest.mark.parametrize("window", [128, None])
def test_prefill_lowers_for_cuda(seq_len, window):
    exported = export_prefill(seq_len, window)
    assert exported.platforms == ("cuda",)
    assert "mosaic_gpu" in exported.mlir_module()


# The defaults, the kernel before issue #18 (ASSUMED residency, all 64 rows in the partials, the
# ring in one tile) and the FITTED residency (2 stages).
LOWERED_DECODE_CONFIGS = [
    None,
    DecodeAttentionConfig(merge_single_split=False),
    DecodeAttentionConfig(residency=Residency.ASSUMED, split_short_caches=False, real_partial_rows=False),
    DecodeAttentionConfig(residency=Residency.FITTED),
]


@pytest.mark.parametrize("config", LOWERED_DECODE_CONFIGS, ids=lambda c: "default" if c is None else variant_id(c))
@pytest.mark.parametrize(
    "batch, cache_len, window",
    [(b, s, None) for b in (1, 64) for s in (4096, 32768, 131072)]
    + [(1, 128, 128), (64, 128, 128)],
)
def test_decode_lowers_for_cuda(batch, cache_len, window, config):
    def f(q, k, v, sinks, q_positions, kv_positions):
        return decode_attention(
            q, k, v, sinks, q_positions, kv_positions, sliding_window=window, softmax_scale=SCALE,
            config=config,
        )

    bf16, i32 = jnp.bfloat16, jnp.int32
    exported = jax.export.export(jax.jit(f), platforms=["cuda"])(
        jax.ShapeDtypeStruct((batch, 1, Q_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((batch, cache_len, KV_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((batch, cache_len, KV_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((Q_HEADS,), bf16),
        jax.ShapeDtypeStruct((batch, 1), i32),
        jax.ShapeDtypeStruct((batch, cache_len), i32),
    )
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize(
    "batch, chunk, cache_len, window",
    # Later prefill chunks: a full layer's 128K cache, a sliding layer's ring plus the chunk.
    [(1, 4096, 131072, None), (8, 512, 4096, None), (1, 4096, 128 + 4096, 128), (64, 128, 256, 128)],
)
def test_prefill_chunk_against_the_cache_lowers_for_cuda(batch, chunk, cache_len, window):
    def f(q, k, v, sinks, q_positions, kv_positions):
        return decode_attention(
            q, k, v, sinks, q_positions, kv_positions, sliding_window=window, softmax_scale=SCALE
        )

    bf16, i32 = jnp.bfloat16, jnp.int32
    exported = jax.export.export(jax.jit(f), platforms=["cuda"])(
        jax.ShapeDtypeStruct((batch, chunk, Q_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((batch, cache_len, KV_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((batch, cache_len, KV_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((Q_HEADS,), bf16),
        jax.ShapeDtypeStruct((batch, chunk), i32),
        jax.ShapeDtypeStruct((batch, cache_len), i32),
    )
    assert "mosaic_gpu" in exported.mlir_module()


def largest_tensor_elements(mlir_text: str) -> int:
    """Elements of the largest statically shaped tensor type in a StableHLO module."""
    shapes = re.findall(r"tensor<((?:\d+x)+)[a-z]", mlir_text)
    return max(math.prod(int(d) for d in s.rstrip("x").split("x")) for s in shapes)


@pytest.mark.parametrize("window", [128, None])
def test_prefill_128k_activation_memory_is_not_quadratic(window):
    """Every array in the exported 128K-token layer is at most the size of q ([T, Hq, D]).

    The XLA reference exported the same way holds a [Hkv, G, T, T] score tensor, so the check
    does detect quadratic memory.
    """
    seq_len = 131072
    q_elements = seq_len * Q_HEADS * HEAD_DIM
    assert largest_tensor_elements(export_prefill(seq_len, window).mlir_module()) <= q_elements

    def reference(q, k, v, sinks):
        positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
        return attention_reference(
            q, k, v, sinks, positions, positions, sliding_window=window, softmax_scale=SCALE
        )

    bf16 = jnp.bfloat16
    reference_module = jax.export.export(jax.jit(reference), platforms=["cuda"])(
        jax.ShapeDtypeStruct((1, seq_len, Q_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((1, seq_len, KV_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((1, seq_len, KV_HEADS, HEAD_DIM), bf16),
        jax.ShapeDtypeStruct((Q_HEADS,), bf16),
    ).mlir_module()
    assert largest_tensor_elements(reference_module) >= Q_HEADS * seq_len * seq_len
