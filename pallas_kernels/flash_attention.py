"""Prefill flash attention for Hopper (Pallas Mosaic GPU) with learned sinks and a sliding window.

A prompt of T tokens attends to itself (positions 0..T-1): causal, optionally limited to the
last ``sliding_window`` keys (the query's own token included), with one sink logit per query
head in the softmax denominator. Semantics are those of
:func:`pallas_kernels.attention_reference.attention_reference` with ``q_positions =
kv_positions = arange(T)``.

Layout of the work. The G = Hq // Hkv query heads that share a KV head are folded into the
rows of one tile: a CTA owns ``block_q`` consecutive tokens of one KV group, so its Q tile has
``block_q * G`` rows ordered (token, head). Every K/V tile is then fetched once per group
instead of once per query head, and a query block needs only ``block_q + window - 1`` keys on
sliding layers. The Q tile arrives by one TMA per token (each a ``[G, D]`` box, which is why G
must be a multiple of the 8-row SMEM tile); the output leaves the same way.

Per CTA the kernel walks only the KV blocks that intersect the visible band: blocks
``[lo, hi)`` with ``hi`` set by causality and ``lo`` by the window, so a sliding layer costs
O(T * window) in FLOPs and bytes. The blocks stream through ``plgpu.emit_pipeline`` with a
dynamic trip count.

Softmax: float32 running max and sum in the exp2 domain (the scale times log2(e) is folded
into one multiply). The running max starts at the row's sink logit and the running sum at 1,
which is ``exp(sink - max)``; rescaling keeps that term exact, so the sink joins the
denominator without an epilogue and a row never reaches 0/0. Scores stay in float32 (the
reference rounds them to bf16 first; the kernel is the more accurate of the two); the
probabilities round to bf16 for the P @ V WGMMA, as in the reference.

Interpret mode (jax 0.11.2) cannot run a WGMMA whose LHS is a register array, nor
``pl.run_state`` over an accumulator (it cannot initialize one from values), so
:attr:`FlashAttentionConfig.interpretable_pv` swaps the P @ V step for an equivalent form: P
staged through SMEM into a fresh accumulator that is added to the running output. That step is
the only code interpret mode does not execute; its compiled form is covered by the CUDA
lowering tests, everything else (TMA, barriers, the dynamic pipeline, masks, sinks) by the
interpret-mode tests.
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

from pallas_kernels.cuda_toolchain import check_attention_toolchain

_LOG2E = math.log2(math.e)
# 128-byte swizzle over (8, 64) bf16 tiles is the layout WGMMA reads without bank conflicts.
_TILING = plgpu.TilingTransform((8, 64))
_SWIZZLE = plgpu.SwizzleTransform(128)


@dataclasses.dataclass(frozen=True)
class FlashAttentionConfig:
    """Tile sizes of :func:`flash_attention`.

    Attributes:
      block_q: query tokens per CTA; the Q tile has ``block_q * G`` rows (G = Hq // Hkv), which
        must be a multiple of 64 (one WGMMA M-tile).
      block_kv: keys per pipelined K/V tile (multiple of 64).
      max_concurrent_steps: K/V tiles in flight (SMEM stages).
      interpretable_pv: compute P @ V in the form interpret mode executes: P staged through SMEM
        and multiplied into a fresh accumulator that is added to the running output, instead of
        a register-LHS WGMMA accumulating in place. None picks the in-place form when compiling
        and the interpretable one in interpret mode.
    """

    block_q: int = 16
    block_kv: int = 64
    max_concurrent_steps: int = 2
    interpretable_pv: bool | None = None

    def __post_init__(self):
        if self.block_q < 1:
            raise ValueError(f"{self.block_q=} must be positive")
        if self.block_kv % 64:
            raise ValueError(f"{self.block_kv=} must be a multiple of 64")
        if self.max_concurrent_steps < 1:
            raise ValueError(f"{self.max_concurrent_steps=} must be at least 1")


def kv_block_range(
    q_start: jax.Array, q_end: jax.Array, num_kv_blocks: int, block_kv: int,
    sliding_window: int | None,
) -> tuple[jax.Array, jax.Array]:
    """KV blocks ``[lo, hi)`` holding a key visible to a query at positions ``[q_start, q_end)``."""
    hi = jnp.minimum(lax.div(q_end - 1, block_kv) + 1, num_kv_blocks)
    if sliding_window is None:
        return jnp.int32(0), hi
    lo = lax.div(jnp.maximum(q_start - sliding_window + 1, 0), block_kv)
    return lo, hi



def online_softmax_update(
    s: jax.Array,
    visible: jax.Array,
    carry: tuple[jax.Array, jax.Array, jax.Array],
    v_smem,
    p_smem,
    scale_log2e: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One key tile of the online softmax, shared by the prefill and decode kernels.

    Args:
      s: float32 ``[rows, block_kv]`` raw q.k scores (WGMMA layout).
      visible: bool ``[rows, block_kv]``: which keys each row may attend to.
      carry: ``(acc [rows, D], running max [rows], running sum [rows])``, in the exp2 domain.
      v_smem: bf16 ``[block_kv, D]`` value tile in shared memory.
      p_smem: None to feed P to the P @ V WGMMA from registers (the GPU form); a bf16
        ``[rows, block_kv]`` shared-memory buffer to stage it there, the form interpret mode runs.
      scale_log2e: softmax scale times log2(e).

    Returns:
      The updated carry.
    """
    acc, m_prev, l_prev = carry
    rows, head_dim = acc.shape
    s = jnp.where(visible, s * scale_log2e, -jnp.inf)
    m_new = jnp.maximum(m_prev, s.max(axis=1))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l_new = l_prev * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    p16 = p.astype(jnp.bfloat16)
    if p_smem is not None:
        p_smem[...] = p16
        plgpu.commit_smem()

        def compute_pv(acc_ref):
            plgpu.wgmma(acc_ref, p_smem, v_smem)
            return acc_ref[...]

        return acc + pl.run_scoped(compute_pv, plgpu.ACC((rows, head_dim), jnp.float32)), m_new, l_new

    def accumulate_pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem)

    return pl.run_state(accumulate_pv)(plgpu.ACC.init(acc)), m_new, l_new

def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, config):
    batch, seq_len, q_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, seq_len) or k.shape[3] != head_dim:
        raise ValueError(f"k {k.shape} and v {v.shape} do not match q {q.shape}")
    kv_heads = k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads=} must be a multiple of {kv_heads=}")
    group = q_heads // kv_heads
    if group % 8:
        raise ValueError(f"query heads per KV head ({group}) must be a multiple of 8")
    if (config.block_q * group) % 64:
        raise ValueError(
            f"block_q * heads per group = {config.block_q * group} must be a multiple of 64"
        )
    if head_dim != 64:
        raise ValueError(f"{head_dim=}: the SMEM layout is written for head_dim 64")
    if sinks.shape != (q_heads,):
        raise ValueError(f"sinks {sinks.shape} must be [{q_heads}]")
    if not (q.dtype == k.dtype == v.dtype == jnp.bfloat16):
        raise ValueError(f"q, k, v must be bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")


@functools.partial(
    jax.jit, static_argnames=("sliding_window", "softmax_scale", "config", "interpret")
)
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sinks: jax.Array,
    *,
    sliding_window: int | None,
    softmax_scale: float,
    config: FlashAttentionConfig | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
    """Causal self-attention of a prompt with per-head sinks.

    Args:
      q: bf16 ``[B, T, Hq, D]``, D = 64, query head h uses KV head ``h // (Hq // Hkv)``.
      k: bf16 ``[B, T, Hkv, D]``, after RoPE.
      v: bf16 ``[B, T, Hkv, D]``.
      sinks: ``[Hq]`` sink logits (any float dtype; not scaled).
      sliding_window: keys per query including its own (128 on gpt-oss's even layers), or None.
      softmax_scale: multiplies q.k.
      config: tile sizes; None for :class:`FlashAttentionConfig` defaults.
      interpret: run in Mosaic GPU interpret mode (on the CPU); a
        ``plgpu.InterpretGPUParams`` sets its options (race detection, for one).

    Returns:
      bf16 ``[B, T, Hq, D]``.
    """
    config = config or FlashAttentionConfig()
    _check_shapes(q, k, v, sinks, config)
    check_attention_toolchain(interpret)
    batch, seq_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    block_q, block_kv = config.block_q, config.block_kv
    rows = block_q * group
    interpretable_pv = config.interpretable_pv
    if interpretable_pv is None:
        interpretable_pv = bool(interpret)

    # K/V are padded to whole tiles so that every TMA stays in bounds; a padded key sits at a
    # position >= T and is only visible to padded query rows, whose output is never stored.
    # Q needs no padding: rows past T re-read token T-1 and are dropped at the store.
    num_kv_blocks = pl.cdiv(seq_len, block_kv)
    kv_pad = num_kv_blocks * block_kv - seq_len
    if kv_pad:
        k = jnp.pad(k, ((0, 0), (0, kv_pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, kv_pad), (0, 0), (0, 0)))
    num_q_blocks = pl.cdiv(seq_len, block_q)
    # Row r of a Q tile is head r % G of its group: the sink logit per row, in the exp2 domain.
    row_sinks = jnp.tile(
        sinks.astype(jnp.float32).reshape(kv_heads, group) * _LOG2E, (1, block_q)
    )
    scale_log2e = softmax_scale * _LOG2E

    def kernel(q_ref, k_ref, v_ref, sink_ref, out_ref, qo_smem, sink_smem, p_smem, in_barrier):
        # Longest causal rows first: the last query blocks have the most KV blocks to walk.
        q_block = num_q_blocks - 1 - lax.axis_index("q")
        kv_head = lax.axis_index("kv_head")
        b = lax.axis_index("batch")
        q_start = q_block * block_q

        for t in range(block_q):
            token = jnp.minimum(q_start + t, seq_len - 1)
            plgpu.copy_gmem_to_smem(
                q_ref.at[b, token, pl.ds(kv_head * group, group)],
                qo_smem.at[pl.ds(t * group, group)],
                in_barrier,
            )
        plgpu.copy_gmem_to_smem(sink_ref.at[kv_head], sink_smem, in_barrier)
        plgpu.barrier_wait(in_barrier)

        sink_row = plgpu.load(sink_smem, layout=plgpu.Layout.WGMMA.reduce(1))
        m_init = sink_row
        l_init = jnp.full((rows,), 1.0, jnp.float32)
        l_init = plgpu.layout_cast(l_init, plgpu.Layout.WGMMA.reduce(1))
        acc_init = plgpu.layout_cast(
            jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA
        )

        lo, hi = kv_block_range(q_start, q_start + block_q, num_kv_blocks, block_kv, sliding_window)
        row_ids = plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 0, layout=plgpu.Layout.WGMMA)
        col_ids = plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 1, layout=plgpu.Layout.WGMMA)
        q_pos = q_start + lax.div(row_ids, group)

        def step(indices, k_smem, v_smem, carry):
            kv_block = lo + indices[0]

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(compute_qk, plgpu.ACC((rows, block_kv), jnp.float32))
            kv_pos = kv_block * block_kv + col_ids
            visible = kv_pos <= q_pos
            if sliding_window is not None:
                visible &= kv_pos > q_pos - sliding_window
            return online_softmax_update(
                s, visible, carry, v_smem, p_smem if interpretable_pv else None, scale_log2e
            )

        kv_spec = plgpu.BlockSpec(
            (block_kv, head_dim), lambda i: (lo + i, 0), transforms=(_TILING, _SWIZZLE)
        )
        acc, _, l_final = plgpu.emit_pipeline(
            step,
            grid=(hi - lo,),
            in_specs=[kv_spec, kv_spec],
            max_concurrent_steps=config.max_concurrent_steps,
            init_carry=(acc_init, m_init, l_init),
        )(k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head])

        out = acc / lax.broadcast_in_dim(l_final, acc.shape, [0])
        qo_smem[...] = out.astype(jnp.bfloat16)
        plgpu.commit_smem()
        for t in range(block_q):

            @pl.when(q_start + t < seq_len)
            def _store():
                plgpu.copy_smem_to_gmem(
                    qo_smem.at[pl.ds(t * group, group)],
                    out_ref.at[b, q_start + t, pl.ds(kv_head * group, group)],
                )

        plgpu.wait_smem_to_gmem(0)

    tiled = dict(transforms=(_TILING, _SWIZZLE))
    p_scratch = plgpu.SMEM((rows, block_kv), jnp.bfloat16, **tiled) if interpretable_pv else None
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=[
            plgpu.SMEM((rows, head_dim), jnp.bfloat16, **tiled),
            plgpu.SMEM((rows,), jnp.float32),
            p_scratch,
            plgpu.Barrier(num_arrivals=block_q + 1),
        ],
        grid=(num_q_blocks, kv_heads, batch),
        grid_names=("q", "kv_head", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret is True else interpret or None,
    )(q, k, v, row_sinks)
