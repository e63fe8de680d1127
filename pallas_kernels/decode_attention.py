"""Attention of new queries against a KV cache (Pallas Mosaic GPU), with sinks: decode steps and
the prefill chunks that follow a prompt's first.

Semantics are exactly :func:`pallas_kernels.attention_reference.attention_reference`: keys are
addressed by the absolute positions stored beside the cache slots, so ragged batch lengths
(empty slots carry ``EMPTY_SLOT``), a full-length cache, the sliding layers' wrapped 128-slot
ring buffer and a ring followed by a chunk's own keys all go through the same code.

Layout of the work. Reading the cache dominates, so each K/V tile must be read once for all
G = Hq // Hkv query heads that share it: ``block_q`` query tokens of one (sequence, KV head)
become the ``block_q * G`` rows of one WGMMA tile (ordered (token, head), padded to a multiple
of 64; padded rows have position -1 and see no key). A decode step is one such query block; a
prefill chunk of T tokens is ``T / block_q`` of them. Flash-decoding splits each query block's
keys into ``num_splits`` contiguous ranges, one CTA each, so a batch of one decode step still
fills the GPU. Each CTA streams its K/V tiles and their positions through
``plgpu.emit_pipeline`` and writes a partial (unnormalized output, running max, running sum);
an XLA epilogue merges the splits and adds the sink to the denominator once.

Only tiles that hold a key visible to the query block are read: the wrapper reduces the int32
positions (1/512 of the cache's bytes at gpt-oss shapes) to the smallest and largest position
of every K/V tile and of every query block, and each query block walks the tiles ``[lo, hi)``
from its first to its last visible one. A 4K-token sequence in a 128K-slot cache reads 4K
slots; a chunk's early query blocks skip its later keys (causality), and on a sliding layer a
query block past the first ``window`` tokens of its chunk skips the ring.

How many CTAs, and what they keep. The split count aims at filling every SM with as many CTAs
as fit there at once (:class:`Residency`): the SM count is the GPU's own when there is one and
:data:`DEFAULT_SM_COUNT` (an H100 or H200) when lowering on the CPU; how many CTAs fit comes
from the SMEM the configured pipeline needs (:func:`smem_bytes`). A cache too short to give
every split a tile (a sliding layer's 128-slot ring at batch 1) can be cut into 64-slot tiles
(:attr:`DecodeAttentionConfig.split_short_caches`). Each CTA writes only the real rows of its
tile (``block_q * G`` of them, rounded up to 8) to the float32 partials, not the padding of its
64-row WGMMA tile.

Interpret mode (jax 0.11.2) cannot run a WGMMA with a register LHS nor ``pl.run_state`` over
an accumulator; :attr:`DecodeAttentionConfig.interpretable_pv` swaps the P @ V step for an
equivalent form (P staged through SMEM into a fresh accumulator added in registers). That step
is the only code interpret mode does not execute; the CUDA lowering tests cover its compiled
form.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import NamedTuple

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention_reference import EMPTY_SLOT
from pallas_kernels.cuda_toolchain import check_attention_toolchain
from pallas_kernels.flash_attention import online_softmax_update

_LOG2E = math.log2(math.e)
_TILING = plgpu.TilingTransform((8, 64))
_SWIZZLE = plgpu.SwizzleTransform(128)
_TILE_ROWS = 64  # one WGMMA M-tile
# SMs of an H100 SXM and of an H200 (both GH100): the split count's SM count when the program is
# lowered without a GPU to ask (jax.export for cuda on the CPU).
DEFAULT_SM_COUNT = 132
# The CTAs per SM that the "assumed" and "fitted" residencies split for.
ASSUMED_CTAS_PER_SM = 2
# Hopper's shared memory per SM, of which the hardware reserves 1 KB per resident CTA.
_SMEM_PER_SM = 228 * 1024
_SMEM_RESERVED_PER_CTA = 1024
# Pallas Mosaic GPU aligns every SMEM allocation to 1 KB; the barriers and ptxas' static SMEM come
# on top (2089 B at 4 stages: 164905 B launched against 162816 B of aligned buffers).
_SMEM_ALIGNMENT = 1024
_SMEM_BARRIERS_AND_STATIC = 3 * 1024
# Rows of a partial are written in 8-row groups: a TMA moves multiples of 16 bytes, and 8 rows of
# the float32 running max are 32.
_PARTIAL_ROW_GROUP = 8
# Each CTA's (first tile, end tile, tiles per split, unused) row is one 16-byte TMA, the minimum.
_RANGE_FIELDS = 4


class Residency(enum.StrEnum):
    """How the split count and the pipeline depth account for the CTAs resident on one SM.

    ASSUMED: splits for :data:`ASSUMED_CTAS_PER_SM` CTAs per SM, with the configured pipeline
      stages whether or not that many fit (with ``split_short_caches`` and ``real_partial_rows``
      off, the kernel before issue #18: at 4 stages of 128-slot tiles a CTA needs 161 KB of
      SMEM, so one fits and the GPU runs two waves).
    FITTED: the stages capped (to no fewer than one) so that :data:`ASSUMED_CTAS_PER_SM` CTAs
      fit, and splits for that many.
    DERIVED: the configured stages, and splits for the CTAs per SM that their SMEM allows
      (registers are not the limit: about 157 a thread allow 3 CTAs of 128 threads).
    """

    ASSUMED = "assumed"
    FITTED = "fitted"
    DERIVED = "derived"


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """Tiling of :func:`decode_attention`.

    Attributes:
      block_q: query tokens per CTA (fewer when the call has fewer); ``block_q * G`` rows make
        one WGMMA tile, padded to a multiple of 64.
      block_kv: cache slots per pipelined tile (multiple of 64; the wrapper shrinks it to a
        shorter cache). A cache whose length is not a multiple of it is padded, which copies
        it: keep long caches at a multiple.
      max_concurrent_steps: tiles in flight per CTA (SMEM stages); :attr:`residency` FITTED
        may lower it.
      num_splits: key ranges per query block processed by separate CTAs; None picks enough
        splits that ``batch * kv_heads * query blocks * num_splits`` fills every SM with the
        CTAs :attr:`residency` counts on.
      residency: see :class:`Residency`.
      sm_count: SMs the split count fills; None asks the device (``core_count`` of
        ``jax.devices()[0]`` when it is a GPU) and takes :data:`DEFAULT_SM_COUNT` without one.
      split_short_caches: halve ``block_kv`` (down to 64) while that gives more CTAs work, for
        caches with fewer tiles than the splits asked for (a sliding layer's ring at batch 1).
      real_partial_rows: write only the real rows of each CTA's tile to the float32 partials
        (``block_q * G`` rounded up to 8), instead of all of its 64-row multiple.
      merge_single_split: when a call has one split (large batches), each CTA normalizes its
        rows itself (sink included) and writes them in bf16: no float32 partials, and no XLA
        merge after the kernel (for a decode step the output needs no copy at all).
      interpretable_pv: compute P @ V in the form interpret mode executes (see the module
        docstring). None picks the in-place register form when compiling and the interpretable
        one in interpret mode.

    The defaults were chosen by the cost model (``python -m benchmarks.kernels.kernel_cost``, on each
    variant's SASS), which no GPU has calibrated yet: a GPU sweep of the variants decides. At
    gpt-oss's decode shapes every variant but the sliding ring at batch 1 is HBM-bound in the
    model, so it ranks them by bytes moved. Real partial rows cut the partials 8x (full layer,
    4K context, batch 1: 4.3 MB to 0.54 MB beside 8.4 MB of KV; 66% to 94% of HBM peak); DERIVED
    splits for the one CTA per SM that 4 stages allow, which halves the splits and the partials
    again with the same busiest-SM work (97%; 32K context: 94% before, 100%); FITTED (2 stages,
    two CTAs per SM) ties with ASSUMED, as the model does not count latency that co-resident
    CTAs would hide. Cutting the sliding ring into 64-slot tiles gives batch 1 16 CTAs instead
    of 8 and the busiest SM 547 loop instructions instead of 917 (0.50 to 0.30 us, issue-bound).
    Merging a single split in the kernel (batch 64: every layer at gpt-oss's shapes) writes the
    bf16 output instead of float32 partials and leaves no XLA merge to launch after the kernel.
    """

    block_q: int = 8
    block_kv: int = 128
    max_concurrent_steps: int = 4
    num_splits: int | None = None
    residency: Residency = Residency.DERIVED
    sm_count: int | None = None
    split_short_caches: bool = True
    real_partial_rows: bool = True
    merge_single_split: bool = True
    interpretable_pv: bool | None = None

    def __post_init__(self):
        if self.block_q < 1:
            raise ValueError(f"{self.block_q=} must be positive")
        if self.block_kv % 64:
            raise ValueError(f"{self.block_kv=} must be a multiple of 64")
        if self.max_concurrent_steps < 1:
            raise ValueError(f"{self.max_concurrent_steps=} must be at least 1")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"{self.num_splits=} must be positive")
        if self.sm_count is not None and self.sm_count < 1:
            raise ValueError(f"{self.sm_count=} must be positive")


def _check_shapes(q, k_cache, v_cache, sinks, q_positions, kv_positions):
    batch, q_len, q_heads, head_dim = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape != (batch, cache_len, kv_heads, head_dim):
        raise ValueError(f"caches {k_cache.shape}, {v_cache.shape} do not match q {q.shape}")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads=} must be a multiple of {kv_heads=}")
    if head_dim != 64:
        raise ValueError(f"{head_dim=}: the SMEM layout is written for head_dim 64")
    if sinks.shape != (q_heads,):
        raise ValueError(f"sinks {sinks.shape} must be [{q_heads}]")
    if q_positions.shape != (batch, q_len) or kv_positions.shape != (batch, cache_len):
        raise ValueError(f"positions {q_positions.shape}, {kv_positions.shape} do not match")
    if not (q.dtype == k_cache.dtype == v_cache.dtype == jnp.bfloat16):
        raise ValueError(f"q and caches must be bfloat16, got {q.dtype}, {k_cache.dtype}")


def device_sm_count() -> int:
    """SMs of the default device when it is a GPU, else :data:`DEFAULT_SM_COUNT`."""
    device = jax.devices()[0]
    core_count = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return core_count or DEFAULT_SM_COUNT


def smem_bytes(rows: int, block_kv: int, stages: int, head_dim: int = 64,
               interpretable_pv: bool = False) -> int:
    """Shared memory one CTA launches with: the pipeline's ``stages`` K, V and position tiles of
    ``block_kv`` slots, the query tile of ``rows`` rows and its partial, each allocation aligned
    to 1 KB, plus an allowance for barriers and ptxas' static SMEM (an upper bound of
    :mod:`benchmarks.kernels.kernel_sass`'s figure)."""

    def aligned(nbytes: int) -> int:
        return pl.cdiv(nbytes, _SMEM_ALIGNMENT) * _SMEM_ALIGNMENT

    pipeline = 2 * aligned(stages * block_kv * head_dim * 2) + aligned(stages * block_kv * 4)
    query = aligned(rows * head_dim * 2) + 2 * aligned(rows * 4) + aligned(_RANGE_FIELDS * 4)
    partial = aligned(rows * head_dim * 4) + 2 * aligned(rows * 4)
    p_stage = aligned(rows * block_kv * 2) if interpretable_pv else 0
    return pipeline + query + partial + p_stage + _SMEM_BARRIERS_AND_STATIC


def ctas_per_sm(smem: int) -> int:
    """CTAs an SM holds at once by shared memory."""
    return _SMEM_PER_SM // (smem + _SMEM_RESERVED_PER_CTA)


class DecodeTiling(NamedTuple):
    """How a call is cut into CTAs: ``num_q_blocks * num_splits * kv_heads * batch`` of them,
    each over at most ``cdiv(visible tiles, num_splits)`` cache tiles of ``block_kv`` slots
    through a pipeline of ``stages``; each writes ``partial_rows`` of its ``rows``-row tile,
    normalized in bf16 when ``merged_in_kernel``, else as float32 partials."""

    block_q: int
    num_q_blocks: int
    block_kv: int
    num_tiles: int
    num_splits: int
    stages: int
    rows: int
    partial_rows: int
    merged_in_kernel: bool


def _working_splits(num_tiles: int, num_splits: int) -> int:
    """Splits of ``num_tiles`` tiles into ``num_splits`` ranges of ``cdiv`` tiles that get one."""
    return pl.cdiv(num_tiles, pl.cdiv(num_tiles, num_splits))


def decode_tiling(config: DecodeAttentionConfig, batch: int, q_len: int, cache_len: int,
                  kv_heads: int, *, q_heads: int, interpretable_pv: bool = False) -> DecodeTiling:
    """The tiling of a call with these shapes (the CTA grid the kernel launches)."""
    block_q = min(config.block_q, q_len)
    num_q_blocks = pl.cdiv(q_len, block_q)
    q_rows = block_q * (q_heads // kv_heads)
    rows = pl.cdiv(q_rows, _TILE_ROWS) * _TILE_ROWS
    partial_rows = rows
    if config.real_partial_rows:
        partial_rows = min(rows, pl.cdiv(q_rows, _PARTIAL_ROW_GROUP) * _PARTIAL_ROW_GROUP)
    block_kv = min(config.block_kv, pl.cdiv(cache_len, 64) * 64)

    stages = config.max_concurrent_steps
    resident = ASSUMED_CTAS_PER_SM
    if config.residency is Residency.DERIVED:
        resident = max(1, ctas_per_sm(smem_bytes(rows, block_kv, stages, 64, interpretable_pv)))
    sm_count = config.sm_count or device_sm_count()
    wanted_splits = config.num_splits or pl.cdiv(resident * sm_count, batch * kv_heads * num_q_blocks)

    num_tiles = pl.cdiv(cache_len, block_kv)
    while (config.split_short_caches and config.num_splits is None and block_kv > 64
           and num_tiles < wanted_splits
           and _working_splits(pl.cdiv(cache_len, block_kv // 2), wanted_splits)
           > _working_splits(num_tiles, wanted_splits)):
        block_kv //= 2
        num_tiles = pl.cdiv(cache_len, block_kv)
    if config.residency is Residency.FITTED:
        while stages > 1 and ctas_per_sm(smem_bytes(rows, block_kv, stages, 64, interpretable_pv)) < resident:
            stages -= 1
    # No more splits than a full cache gives work to (33 asked of 256 tiles: 32 of 8 tiles each).
    num_splits = _working_splits(num_tiles, wanted_splits)
    merged_in_kernel = config.merge_single_split and num_splits == 1
    return DecodeTiling(block_q, num_q_blocks, block_kv, num_tiles, num_splits, stages, rows, partial_rows,
                        merged_in_kernel)


def visible_tile_ranges(
    q_positions: jax.Array, kv_positions: jax.Array, block_q: int, block_kv: int,
    sliding_window: int | None,
) -> tuple[jax.Array, jax.Array]:
    """K/V tiles ``[lo, hi)`` from the first to the last one a query block can see.

    Args:
      q_positions: int32 ``[B, Tq]``, Tq a multiple of ``block_q``; negative: padding.
      kv_positions: int32 ``[B, S]``, S a multiple of ``block_kv``; negative: empty slot.

    Returns:
      int32 ``lo, hi``, each ``[B, Tq / block_q]``; ``lo == hi == 0`` where no tile is visible.
    """
    batch = q_positions.shape[0]
    none = jnp.iinfo(jnp.int32).max
    tiles = kv_positions.reshape(batch, -1, block_kv)
    kv_max = tiles.max(axis=2)[:, None, :]  # negative: an empty tile
    kv_min = jnp.where(tiles >= 0, tiles, none).min(axis=2)[:, None, :]
    blocks = q_positions.reshape(batch, -1, block_q)
    q_max = blocks.max(axis=2)[:, :, None]  # negative: a block of padding
    q_min = jnp.where(blocks >= 0, blocks, none).min(axis=2)[:, :, None]
    # A tile is visible when some key is at or before the last query and, with a window, after
    # the window's start of the first query; that bounds, and the kernel's mask decides exactly.
    visible = (kv_max >= 0) & (kv_min <= q_max)
    if sliding_window is not None:
        visible &= kv_max > q_min - sliding_window
    num_tiles = tiles.shape[1]
    lo = jnp.argmax(visible, axis=2)
    hi = num_tiles - jnp.argmax(visible[:, :, ::-1], axis=2)
    found = visible.any(axis=2)
    return jnp.where(found, lo, 0).astype(jnp.int32), jnp.where(found, hi, 0).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("sliding_window", "softmax_scale", "config", "interpret")
)
def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    sinks: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    sliding_window: int | None,
    softmax_scale: float,
    config: DecodeAttentionConfig | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
    """Attention of ``Tq`` new queries per sequence against a KV cache, with per-head sinks.

    Args:
      q: bf16 ``[B, Tq, Hq, D]``, D = 64; query head h uses KV head ``h // (Hq // Hkv)``.
      k_cache: bf16 ``[B, S, Hkv, D]``.
      v_cache: bf16 ``[B, S, Hkv, D]``.
      sinks: ``[Hq]`` sink logits (not scaled).
      q_positions: int32 ``[B, Tq]`` absolute positions of the queries; negative: padding (its
        output is zero).
      kv_positions: int32 ``[B, S]`` absolute position held by each slot, ``EMPTY_SLOT`` (-1)
        for none.
      sliding_window: keys per query including its own, or None for full attention.
      softmax_scale: multiplies q.k.
      config: tiling; None for :class:`DecodeAttentionConfig` defaults.
      interpret: run in Mosaic GPU interpret mode (on the CPU); a
        ``plgpu.InterpretGPUParams`` sets its options (race detection, for one).

    Returns:
      bf16 ``[B, Tq, Hq, D]``.
    """
    config = config or DecodeAttentionConfig()
    _check_shapes(q, k_cache, v_cache, sinks, q_positions, kv_positions)
    check_attention_toolchain(interpret)
    batch, q_len, q_heads, head_dim = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    interpretable_pv = config.interpretable_pv
    if interpretable_pv is None:
        interpretable_pv = bool(interpret)
    tiling = decode_tiling(config, batch, q_len, cache_len, kv_heads, q_heads=q_heads,
                           interpretable_pv=interpretable_pv)
    block_q, num_q_blocks, block_kv, num_tiles, num_splits, stages, rows, partial_rows, merged = tiling
    q_rows = block_q * group  # real rows of a tile

    # Padded slots are empty: no query sees them, and no TMA reads past the cache.
    slot_pad = num_tiles * block_kv - cache_len
    if slot_pad:
        k_cache = jnp.pad(k_cache, ((0, 0), (0, slot_pad), (0, 0), (0, 0)))
        v_cache = jnp.pad(v_cache, ((0, 0), (0, slot_pad), (0, 0), (0, 0)))
    kv_positions = jnp.pad(
        kv_positions.astype(jnp.int32), ((0, 0), (0, slot_pad)), constant_values=EMPTY_SLOT
    )
    q_positions = jnp.pad(
        q_positions.astype(jnp.int32), ((0, 0), (0, num_q_blocks * block_q - q_len)),
        constant_values=-1,
    )

    # Tile rows ordered (token, head within group); padding rows get position -1 (see no key).
    q_tiles = jnp.pad(q, ((0, 0), (0, num_q_blocks * block_q - q_len), (0, 0), (0, 0)))
    q_tiles = q_tiles.reshape(batch, num_q_blocks, block_q, kv_heads, group, head_dim)
    q_tiles = q_tiles.transpose(0, 3, 1, 2, 4, 5).reshape(batch, kv_heads, num_q_blocks, q_rows, head_dim)
    q_tiles = jnp.pad(q_tiles, ((0, 0), (0, 0), (0, 0), (0, rows - q_rows), (0, 0)))
    row_positions = jnp.repeat(q_positions, group, axis=1).reshape(batch, num_q_blocks, q_rows)
    row_positions = jnp.pad(row_positions, ((0, 0), (0, 0), (0, rows - q_rows)), constant_values=-1)
    sink_log2 = sinks.astype(jnp.float32).reshape(kv_heads, group) * _LOG2E
    row_sinks = jnp.pad(jnp.tile(sink_log2, (1, block_q)), ((0, 0), (0, rows - q_rows)))
    lo, hi = visible_tile_ranges(q_positions, kv_positions, block_q, block_kv, sliding_window)
    per_split = pl.cdiv(hi - lo, num_splits)
    tile_ranges = jnp.stack([lo, hi, per_split, jnp.zeros_like(lo)], axis=2)
    scale_log2e = softmax_scale * _LOG2E
    num_outs = 1 if merged else 3  # the normalized rows, or a split's output, max and sum

    def kernel(
        q_ref, k_ref, v_ref, kv_pos_ref, q_pos_ref, sink_ref, ranges_ref, *outs_and_scratch,
    ):
        out_refs, (q_smem, q_pos_smem, sink_smem, range_smem, p_smem, in_barrier, *out_smems) = (
            outs_and_scratch[:num_outs], outs_and_scratch[num_outs:])
        # Later query blocks of a chunk see more keys: start them first.
        q_block = num_q_blocks - 1 - lax.div(lax.axis_index("work"), num_splits)
        split = lax.rem(lax.axis_index("work"), num_splits)
        kv_head = lax.axis_index("kv_head")
        b = lax.axis_index("batch")
        plgpu.copy_gmem_to_smem(q_ref.at[b, kv_head, q_block], q_smem, in_barrier)
        plgpu.copy_gmem_to_smem(q_pos_ref.at[b, q_block], q_pos_smem, in_barrier)
        plgpu.copy_gmem_to_smem(sink_ref.at[kv_head], sink_smem, in_barrier)
        plgpu.copy_gmem_to_smem(ranges_ref.at[b, q_block], range_smem, in_barrier)
        plgpu.barrier_wait(in_barrier)

        row_layout = plgpu.Layout.WGMMA.reduce(1)
        m_init = plgpu.load(sink_smem, layout=row_layout)
        l_init = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout)
        acc_init = plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        q_pos = lax.broadcast_in_dim(
            plgpu.load(q_pos_smem, layout=row_layout), (rows, block_kv), [0]
        )
        first = range_smem[0] + split * range_smem[2]
        last = jnp.minimum(first + range_smem[2], range_smem[1])

        def step(_, k_smem, v_smem, kv_pos_smem, carry):

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(compute_qk, plgpu.ACC((rows, block_kv), jnp.float32))
            kv_pos = lax.broadcast_in_dim(
                plgpu.load(kv_pos_smem, layout=plgpu.Layout.WGMMA.reduce(0)), s.shape, [1]
            )
            visible = (kv_pos >= 0) & (kv_pos <= q_pos)
            if sliding_window is not None:
                visible &= kv_pos > q_pos - sliding_window
            return online_softmax_update(
                s, visible, carry, v_smem, p_smem if interpretable_pv else None, scale_log2e
            )

        kv_spec = plgpu.BlockSpec(
            (block_kv, head_dim), lambda i: (first + i, 0), transforms=(_TILING, _SWIZZLE)
        )
        pos_spec = plgpu.BlockSpec((block_kv,), lambda i: (first + i,))
        acc, m_final, l_final = plgpu.emit_pipeline(
            step,
            grid=(jnp.maximum(last - first, 0),),
            in_specs=[kv_spec, kv_spec, pos_spec],
            max_concurrent_steps=stages,
            init_carry=(acc_init, m_init, l_init),
        )(k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head], kv_pos_ref.at[b])

        if merged:
            # The split's max started at the sink, so the sink's share of the denominator is
            # exp2(sink - max), as in the XLA merge.
            denominator = l_final + jnp.exp2(m_init - m_final)
            tiles = [acc / lax.broadcast_in_dim(denominator, acc.shape, [0])]
        else:
            tiles = [acc, m_final, l_final]
        for tile, out_smem in zip(tiles, out_smems):
            out_smem[...] = tile.astype(out_smem.dtype)
        plgpu.commit_smem()
        # Only the real rows (and those up to the next 8) go out: padding rows hold nothing.
        for out_smem, out_ref in zip(out_smems, out_refs):
            where = (b, kv_head, q_block) if merged else (b, kv_head, q_block, split)
            plgpu.copy_smem_to_gmem(out_smem.at[:partial_rows], out_ref.at[where])
        plgpu.wait_smem_to_gmem(0)

    tiled = dict(transforms=(_TILING, _SWIZZLE))
    if merged:  # the normalized rows, bf16
        out_shapes = [((batch, kv_heads, num_q_blocks, partial_rows, head_dim), (rows, head_dim), q.dtype)]
    else:  # the unnormalized output, running max and running sum of each split, float32
        partial_shape = (batch, kv_heads, num_q_blocks, num_splits, partial_rows)
        out_shapes = [((*partial_shape, head_dim), (rows, head_dim), jnp.float32),
                      (partial_shape, (rows,), jnp.float32), (partial_shape, (rows,), jnp.float32)]
    outs = plgpu.kernel(
        kernel,
        out_type=tuple(jax.ShapeDtypeStruct(shape, dtype) for shape, _, dtype in out_shapes),
        scratch_types=[
            plgpu.SMEM((rows, head_dim), jnp.bfloat16, **tiled),
            plgpu.SMEM((rows,), jnp.int32),
            plgpu.SMEM((rows,), jnp.float32),
            plgpu.SMEM((_RANGE_FIELDS,), jnp.int32),
            plgpu.SMEM((rows, block_kv), jnp.bfloat16, **tiled) if interpretable_pv else None,
            plgpu.Barrier(num_arrivals=4),
            *(plgpu.SMEM(tile, dtype) for _, tile, dtype in out_shapes),
        ],
        grid=(num_q_blocks * num_splits, kv_heads, batch),
        grid_names=("work", "kv_head", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret is True else interpret or None,
    )(q_tiles, k_cache, v_cache, kv_positions, row_positions, row_sinks, tile_ranges)

    if merged:
        (out,) = outs
    else:
        # Merge the splits (exp2 domain); every split's max starts at the sink, so it is finite
        # and the sink enters the denominator exactly once, here.
        acc_parts, m_parts, l_parts = outs
        m_all = jnp.max(m_parts, axis=3)
        weights = jnp.exp2(m_parts - m_all[:, :, :, None])
        partial_sinks = row_sinks[None, :, None, :partial_rows]
        denominator = jnp.sum(l_parts * weights, axis=3) + jnp.exp2(partial_sinks - m_all)
        out = jnp.sum(acc_parts * weights[..., None], axis=3) / denominator[..., None]
    out = out[:, :, :, :q_rows].reshape(batch, kv_heads, num_q_blocks, block_q, group, head_dim)
    out = out.transpose(0, 2, 3, 1, 4, 5).reshape(batch, num_q_blocks * block_q, q_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)
