"""Decode attention for Hopper (Pallas Mosaic GPU): new queries against a KV cache, with sinks.

Semantics are exactly :func:`pallas_kernels.attention_reference.attention_reference`: keys are
addressed by the absolute positions stored beside the cache slots, so ragged batch lengths
(empty slots carry ``EMPTY_SLOT``), a full-length cache and the sliding layers' wrapped
128-slot ring buffer all go through the same code.

Layout of the work. Decode is bound by reading the cache, so each K/V tile must be read once
for all G = Hq // Hkv query heads that share it: the ``Tq * G`` queries of one (sequence, KV
head) become the rows of one WGMMA tile (ordered (token, head), padded to a multiple of 64;
padded rows have position -1 and see no key). Flash-decoding splits the cache into
``num_splits`` contiguous ranges, one CTA per (split, KV head, sequence), so a batch of one
still fills the GPU. Each CTA streams its K/V tiles and their positions through
``plgpu.emit_pipeline`` and writes a partial (unnormalized output, running max, running sum);
an XLA epilogue merges the splits and adds the sink to the denominator once.

Tiles past a sequence's last occupied slot are not read: the wrapper computes, per sequence,
the number of tiles up to the last slot whose position is not ``EMPTY_SLOT`` (a reduction
over the int32 positions, 1/512 of the cache's bytes at gpt-oss shapes), so a 4K-token
sequence in a 128K-slot cache reads 4K slots.

Interpret mode (jax 0.11.2) cannot run a WGMMA with a register LHS nor ``pl.run_state`` over
an accumulator; :attr:`DecodeAttentionConfig.interpretable_pv` swaps the P @ V step for an
equivalent form (P staged through SMEM into a fresh accumulator added in registers). That step
is the only code interpret mode does not execute; the CUDA lowering tests cover its compiled
form.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention import online_softmax_update

_LOG2E = math.log2(math.e)
_TILING = plgpu.TilingTransform((8, 64))
_SWIZZLE = plgpu.SwizzleTransform(128)
# Enough CTAs to cover an H100's 132 SMs twice, so a small batch still streams from every SM.
_TARGET_CTAS = 2 * 132


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """Tiling of :func:`decode_attention`.

    Attributes:
      block_kv: cache slots per pipelined tile (multiple of 64, dividing the cache length; the
        wrapper shrinks it to the cache length when the cache is shorter).
      max_concurrent_steps: tiles in flight per CTA (SMEM stages).
      num_splits: cache ranges processed by separate CTAs; None picks enough splits that
        ``batch * kv_heads * num_splits`` covers the GPU twice.
      interpretable_pv: compute P @ V in the form interpret mode executes (see the module
        docstring). None picks the in-place register form when compiling and the interpretable
        one in interpret mode.
    """

    block_kv: int = 128
    max_concurrent_steps: int = 4
    num_splits: int | None = None
    interpretable_pv: bool | None = None

    def __post_init__(self):
        if self.block_kv % 64:
            raise ValueError(f"{self.block_kv=} must be a multiple of 64")
        if self.max_concurrent_steps < 1:
            raise ValueError(f"{self.max_concurrent_steps=} must be at least 1")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"{self.num_splits=} must be positive")


def _check_shapes(q, k_cache, v_cache, sinks, q_positions, kv_positions):
    batch, q_len, q_heads, head_dim = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape != (batch, cache_len, kv_heads, head_dim):
        raise ValueError(f"caches {k_cache.shape}, {v_cache.shape} do not match q {q.shape}")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads=} must be a multiple of {kv_heads=}")
    if head_dim != 64:
        raise ValueError(f"{head_dim=}: the SMEM layout is written for head_dim 64")
    if cache_len % 64:
        raise ValueError(f"cache length {cache_len} must be a multiple of 64")
    if sinks.shape != (q_heads,):
        raise ValueError(f"sinks {sinks.shape} must be [{q_heads}]")
    if q_positions.shape != (batch, q_len) or kv_positions.shape != (batch, cache_len):
        raise ValueError(f"positions {q_positions.shape}, {kv_positions.shape} do not match")
    if not (q.dtype == k_cache.dtype == v_cache.dtype == jnp.bfloat16):
        raise ValueError(f"q and caches must be bfloat16, got {q.dtype}, {k_cache.dtype}")


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
      k_cache: bf16 ``[B, S, Hkv, D]``, S a multiple of 64.
      v_cache: bf16 ``[B, S, Hkv, D]``.
      sinks: ``[Hq]`` sink logits (not scaled).
      q_positions: int32 ``[B, Tq]`` absolute positions of the queries.
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
    batch, q_len, q_heads, head_dim = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    rows = pl.cdiv(q_len * group, 64) * 64
    block_kv = min(config.block_kv, cache_len)
    if cache_len % block_kv:
        raise ValueError(f"cache length {cache_len} must be a multiple of {block_kv=}")
    num_blocks = cache_len // block_kv
    num_splits = config.num_splits or pl.cdiv(_TARGET_CTAS, batch * kv_heads)
    blocks_per_split = pl.cdiv(num_blocks, min(num_splits, num_blocks))
    num_splits = pl.cdiv(num_blocks, blocks_per_split)
    interpretable_pv = config.interpretable_pv
    if interpretable_pv is None:
        interpretable_pv = bool(interpret)

    # Rows ordered (token, head within group); padding rows get position -1 (see no key).
    pad_rows = rows - q_len * group
    q_rows = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = jnp.pad(
        q_rows.reshape(batch, kv_heads, q_len * group, head_dim),
        ((0, 0), (0, 0), (0, pad_rows), (0, 0)),
    )
    row_positions = jnp.pad(
        jnp.repeat(q_positions.astype(jnp.int32), group, axis=1),
        ((0, 0), (0, pad_rows)),
        constant_values=-1,
    )
    sink_log2 = sinks.astype(jnp.float32).reshape(kv_heads, group) * _LOG2E
    row_sinks = jnp.pad(jnp.tile(sink_log2, (1, q_len)), ((0, 0), (0, pad_rows)))
    kv_positions = kv_positions.astype(jnp.int32)
    slot_ids = jnp.arange(1, cache_len + 1, dtype=jnp.int32)
    occupied_len = jnp.max(jnp.where(kv_positions >= 0, slot_ids, 0), axis=1)
    # [B, 4] so that each sequence's row is one 16-byte TMA (the minimum transfer).
    occupied_blocks = jnp.broadcast_to(pl.cdiv(occupied_len, block_kv)[:, None], (batch, 4))
    scale_log2e = softmax_scale * _LOG2E

    def kernel(
        q_ref, k_ref, v_ref, kv_pos_ref, q_pos_ref, sink_ref, blocks_ref,
        acc_out_ref, m_out_ref, l_out_ref,
        q_smem, q_pos_smem, sink_smem, blocks_smem, p_smem, acc_smem, m_smem, l_smem, in_barrier,
    ):
        split = lax.axis_index("split")
        kv_head = lax.axis_index("kv_head")
        b = lax.axis_index("batch")
        plgpu.copy_gmem_to_smem(q_ref.at[b, kv_head], q_smem, in_barrier)
        plgpu.copy_gmem_to_smem(q_pos_ref.at[b], q_pos_smem, in_barrier)
        plgpu.copy_gmem_to_smem(sink_ref.at[kv_head], sink_smem, in_barrier)
        plgpu.copy_gmem_to_smem(blocks_ref.at[b], blocks_smem, in_barrier)
        plgpu.barrier_wait(in_barrier)

        row_layout = plgpu.Layout.WGMMA.reduce(1)
        m_init = plgpu.load(sink_smem, layout=row_layout)
        l_init = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout)
        acc_init = plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        q_pos = lax.broadcast_in_dim(
            plgpu.load(q_pos_smem, layout=row_layout), (rows, block_kv), [0]
        )
        first = split * blocks_per_split
        last = jnp.minimum(first + blocks_per_split, blocks_smem[0])

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
            max_concurrent_steps=config.max_concurrent_steps,
            init_carry=(acc_init, m_init, l_init),
        )(k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head], kv_pos_ref.at[b])

        acc_smem[...] = acc
        m_smem[...] = m_final
        l_smem[...] = l_final
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(acc_smem, acc_out_ref.at[b, kv_head, split])
        plgpu.copy_smem_to_gmem(m_smem, m_out_ref.at[b, kv_head, split])
        plgpu.copy_smem_to_gmem(l_smem, l_out_ref.at[b, kv_head, split])
        plgpu.wait_smem_to_gmem(0)

    tiled = dict(transforms=(_TILING, _SWIZZLE))
    partial_shape = (batch, kv_heads, num_splits, rows)
    acc_parts, m_parts, l_parts = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ),
        scratch_types=[
            plgpu.SMEM((rows, head_dim), jnp.bfloat16, **tiled),
            plgpu.SMEM((rows,), jnp.int32),
            plgpu.SMEM((rows,), jnp.float32),
            plgpu.SMEM((4,), jnp.int32),
            plgpu.SMEM((rows, block_kv), jnp.bfloat16, **tiled) if interpretable_pv else None,
            plgpu.SMEM((rows, head_dim), jnp.float32),
            plgpu.SMEM((rows,), jnp.float32),
            plgpu.SMEM((rows,), jnp.float32),
            plgpu.Barrier(num_arrivals=4),
        ],
        grid=(num_splits, kv_heads, batch),
        grid_names=("split", "kv_head", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret is True else interpret or None,
    )(q_rows, k_cache, v_cache, kv_positions, row_positions, row_sinks, occupied_blocks)

    # Merge the splits (exp2 domain); every split's max starts at the sink, so it is finite and
    # the sink enters the denominator exactly once, here.
    m_all = jnp.max(m_parts, axis=2)
    weights = jnp.exp2(m_parts - m_all[:, :, None])
    denominator = jnp.sum(l_parts * weights, axis=2) + jnp.exp2(row_sinks[None] - m_all)
    out = jnp.sum(acc_parts * weights[..., None], axis=2) / denominator[..., None]
    out = out[:, :, : q_len * group].reshape(batch, kv_heads, q_len, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(q.shape).astype(q.dtype)
