"""MXFP4 grouped expert matmul for Hopper GPUs (Pallas Mosaic GPU).

Computes what :func:`pallas_kernels.mxfp4_moe_reference.mxfp4_grouped_matmul_reference` computes,
reading the checkpoint's packed MXFP4 expert weights straight from HBM: the uint8 bytes stream
through shared memory (TMA, ``plgpu.emit_pipeline``), are decoded with integer and bit operations
into bf16 (Hopper has no FP4 casts), scaled by ``2**(s - 127)``, and fed to WGMMA with float32
accumulation. The weights never exist in bf16 outside a tile.

Structure:

* **Swap A/B.** The accumulator is ``[block_n weight rows, block_m tokens]``: the weights fill
  WGMMA's 64-row M side and the tokens its N side, which can be as small as 8. Decode-sized
  groups (1..64 rows per expert) therefore waste no 64-row tile on padding tokens, and the
  token tile shrinks with the call: ``block_m`` is the smallest power of two >= 8 that holds
  all rows (capped by the config).
* **De-interleaved K.** Byte j of a block holds element 2j (low nibble) and 2j+1 (high nibble).
  A byte tile ``[block_n, block_kb]`` decodes to the even-K and the odd-K halves of the weights,
  and the activations are split into even and odd columns once per call (in XLA), so each byte
  tile feeds two WGMMAs and nothing is interleaved in registers. An E8M0 scale covers 16 bytes,
  i.e. 16 columns of each half, so it broadcasts over aligned 16-column slices.
* **Tasks.** Rows are sorted by expert. A task is a window of ``block_m`` rows holding part of
  one expert's group. A window starts at its group's first row rounded down to a multiple of 8
  (TMA into the 8-row tiled activation tile), so a group of up to ``block_m - 7`` rows has one
  task: at decode sizes each active expert's weights are read once per call. Larger groups
  re-read their weights once per ``block_m`` rows. One extra pseudo-group covers the rows past
  ``sum(group_sizes)``: its tasks write zeros, so those rows come out as 0 like the reference's.
* **Grid order.** The grid is ``(tasks, N / 64)`` and Pallas runs its last axis fastest (CUDA's
  x), so a task's N tiles run side by side: its activation rows come from HBM once, then from
  L2, and the next task of the same expert finds most of its weights still in L2. (Tasks
  fastest would stream all the activations from HBM again for every N tile.) The task axis is
  CUDA's y, at most 65535 tasks: about 4M rows at ``block_m=64``.
* **Epilogues, fused.** ``"bias"``: ``bf16(acc) + bias`` in bf16. ``"bias_swiglu"``: the gate
  (even) and linear (odd) weight rows are read as two strided views of the same blocks (no
  repack) into two accumulators, and the clamped SwiGLU runs on the tile, rounding to bf16 after
  each operation like the reference. ``row_weights`` multiplies the bf16 result in float32.
* **Partial tiles.** N is tiled by 64 (2880 = 45 * 64, 5760 = 90 * 64) and K/2 by ``block_kb``
  bytes (1440 = 15 * 96), so gpt-oss sizes need no masking. Row windows reach up to
  ``block_m - 1`` rows past the last row: the activations are padded by ``block_m`` rows (to a
  multiple of 8) in XLA so every read stays in bounds, and stores write only each task's own
  rows (power-of-two TMA stores), so the output is exactly ``[M, N]``.

Scales (:attr:`Config.scale_source`): the checkpoint's ``[E, N, K/32]`` rows are 90 bytes for
K = 2880, not a multiple of 16, so TMA cannot stream them beside the bytes, but a CTA's are
contiguous: its 64 rows (128 for SwiGLU's two halves) of K/32 bytes, 16-byte aligned. One TMA
at the CTA's start copies them to shared memory as 128-byte rows, and each step reads its rows'
scales from there (``"smem"``). ``"global"`` loads each thread's scales from global memory one
pipeline step ahead instead, rows 90 or 180 bytes apart: 8 L1 wavefronts per warp's load
where shared memory takes 1 (``benchmarks.kernels.kernel_cost``'s load/store bound).

Nibble decoding (:attr:`Config.e2m1_decode`, the forms in :mod:`pallas_kernels.e2m1`). On the
GPU a code's exponent and mantissa bits go to the bottom of a bf16 exponent field, which gives
the value times 2**-126 (a subnormal for 0.5), and one bf16 multiply by 2**126 restores it, as
triton_kernels' Hopper MXFP4 path does; ``"word"`` builds those bits on 32-bit words (about 6
instructions per weight byte with the multiplies, against about 15 for ``"multiply"``'s uint16
tiles). XLA on the CPU flushes subnormal bf16 to zero, so interpret mode would decode 0.5 as 0;
there an integer-only form (``"select"``) selects the bits of 0 and 0.5 directly, exact
anywhere, for about twice the integer operations (``benchmarks/gpu/moe_kernel.py`` times all three).

Interpret mode (``interpret=plgpu.InterpretGPUParams()``) runs everything except WGMMA with a
register LHS, which the interpreter refuses: :class:`Config.decoded_lhs` switches between
feeding the decoded tile from registers (the GPU default) and storing it to swizzled shared
memory first. With ``config=None`` the kernel picks the GPU forms on the GPU and the
interpretable ones (shared memory, integer-only decode) in interpret mode, so the two
variants differ only in those two places; the GPU forms are covered by the CUDA lowering tests
here and run for real by the ``kernel_mode="gpu"`` tests on a Hopper GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.numpy as jnp
import ml_dtypes
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import e2m1, mxfp4
from pallas_kernels.mxfp4_moe_reference import SWIGLU_ALPHA, SWIGLU_LIMIT, Epilogue

BLOCK_N = 64
"""Weight rows per tile: one warpgroup's WGMMA M."""

_MIN_BLOCK_M = 8  # WGMMA's smallest N
_ROW_ALIGN = 8  # row tiling of the swizzled activation tiles
_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y, where the task axis goes
_SMEM_BYTES = 227 * 1024  # per block on sm_90
_BYTES_PER_SCALE = mxfp4.BYTES_PER_BLOCK  # 16 packed bytes = 32 values share a scale
_SCALE_ROW_BYTES = 128  # a CTA's scales as TMA rows of 128 bytes (a TMA box is <= 256 a side)
_MAX_TMA_BOX = 256
_ROW = plgpu.Layout.WGMMA.reduce(1)  # [block_n] vector, one value per accumulator row
_COL = plgpu.Layout.WGMMA.reduce(0)  # [block_m] vector, one value per accumulator column
_ALPHA_BF16 = float(jnp.bfloat16(SWIGLU_ALPHA))  # the reference multiplies a bf16 tile by it


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning knobs of :func:`mxfp4_grouped_matmul`.

    Attributes:
      block_m: the most rows (tokens) one tile holds, WGMMA's N: a multiple of 8, at most 256.
        A call with fewer rows uses the smallest power of two >= 8 that holds them.
      block_kb: packed bytes of K per pipeline step (2 * block_kb weight columns); a multiple
        of 32 (the 64-byte swizzle of the bf16 activation tiles) dividing K/2.
      max_concurrent_steps: pipeline depth (TMA copies in flight).
      decoded_lhs: ``"registers"`` feeds the decoded weight tile to WGMMA from registers (the
        GPU path); ``"smem"`` stores it to swizzled shared memory first (the path interpret mode
        can run).
      scale_source: ``"smem"`` copies a CTA's scales (``halves * 64 * K/32`` contiguous bytes)
        to shared memory with one TMA at its start, and each step's scales are read from there
        (one L1 wavefront a warp's load; the default, by the cost model's load/store bound until
        a GPU measures it); ``"global"`` loads each thread's scales from global memory one step
        ahead (rows 90 or 180 bytes apart: 8 wavefronts a warp's load).
      fold_scales: with ``"word"`` decoding and ``"smem"`` scales, a CTA whose scales are all in
        1..128 (every gpt-oss weight's: weights below 12) multiplies its decoded tiles once, by ``2**(s - 1)``,
        instead of by 2**126 and then ``2**(s - 127)``: 2 instead of 4 bf16x2 multiplies per
        weight byte pair (:func:`pallas_kernels.e2m1.folded_scale_bits`). Decided per CTA from its
        scales in shared memory before its pipeline starts (one pipeline or the other, so
        neither loop branches), which makes the scales' copy no longer overlap the first weight
        copies: one memory latency per CTA that the cost model does not count (at decode sizes,
        with one wave of CTAs, about as long as the 2 multiplies saved; a GPU sweep decides).
        Exact either way.
      e2m1_decode: ``"word"`` decodes a nibble through a subnormal bf16 and a multiply by
        2**126, built on 32-bit words (the GPU default, chosen by the SASS instruction counts of
        ``benchmarks.kernels.kernel_cost`` until a GPU measures it); ``"multiply"`` the same on uint16
        tiles (the earlier GPU path); ``"select"`` with integer operations only (interpret
        mode's: XLA on the CPU flushes subnormals, and it cannot run ``"word"``'s inline
        Mosaic GPU code).
    """

    block_m: int = 64
    block_kb: int = 96
    max_concurrent_steps: int = 4
    decoded_lhs: Literal["registers", "smem"] = "registers"
    scale_source: Literal["smem", "global"] = "smem"
    fold_scales: bool = True
    e2m1_decode: Literal["word", "multiply", "select"] = "word"

    def __post_init__(self):
        if self.block_m % _MIN_BLOCK_M or not _MIN_BLOCK_M <= self.block_m <= 256:
            raise ValueError(f"block_m={self.block_m} must be a multiple of 8 in [8, 256]")
        if self.block_kb % 32:
            raise ValueError(f"block_kb={self.block_kb} must be a multiple of 32")
        if self.max_concurrent_steps < 1:
            raise ValueError("max_concurrent_steps must be positive")
        if self.decoded_lhs not in ("registers", "smem"):
            raise ValueError(f"decoded_lhs={self.decoded_lhs!r} must be 'registers' or 'smem'")
        if self.scale_source not in ("smem", "global"):
            raise ValueError(f"scale_source={self.scale_source!r} must be 'smem' or 'global'")
        if self.e2m1_decode not in ("word", "multiply", "select"):
            raise ValueError(f"e2m1_decode={self.e2m1_decode!r} must be 'word', 'multiply' or 'select'")


def _swizzled(
    dtype: jnp.dtype, swizzle: int
) -> tuple[plgpu.TilingTransform, plgpu.SwizzleTransform]:
    bits = jnp.dtype(dtype).itemsize * 8
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _round(x: jax.Array) -> jax.Array:
    """Round a float32 tile to bf16 and back: one rounding point of the bf16 reference."""
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def _clamped_swiglu(gate: jax.Array, linear: jax.Array, limit: float) -> jax.Array:
    """The reference's bf16 clamped SwiGLU on bf16-valued float32 tiles, same rounding points.

    XLA expands the bf16 logistic into ``1 / (1 + exp(-x))`` with each operation rounded to
    bf16, and rounds alpha to bf16 first; Mosaic GPU has no logistic primitive, so spelling it
    out here reproduces the reference bit for bit (up to the last bit of ``exp``). The
    reference clamps to the limit rounded to bf16 (gpt-oss's 7.0 is exact), so this does too.
    """
    limit = float(ml_dtypes.bfloat16(limit))  # ml_dtypes: in the kernel's trace jnp would give a traced value
    gate = jnp.minimum(gate, limit)
    linear = jnp.clip(linear, -limit, limit)
    scaled = _round(_ALPHA_BF16 * gate)
    sigmoid = _round(1.0 / _round(1.0 + _round(jnp.exp(-scaled))))
    return _round(_round(gate * sigmoid) * _round(linear + 1.0))


def decode_packed(packed: jax.Array, scale: Callable[[Callable[[jax.Array], jax.Array]], jax.Array],
                  form: Literal["word", "multiply", "select"], *, fold: bool, layout: Any) -> tuple[jax.Array, jax.Array]:
    """The even-K and odd-K bf16 halves of a packed uint8 weight tile, scaled: 2 x ``packed.shape``.

    ``scale(to_bf16)`` is the tile of each weight's scale, its bytes (uint16) turned into bf16 by
    ``to_bf16`` (:func:`e2m1.scale_bits` or :func:`e2m1.folded_scale_bits`). ``form`` is
    :attr:`Config.e2m1_decode`; ``"word"`` runs in the register ``layout`` the tile is in (the
    operand layout of the MMA it feeds). ``fold``: every scale of the CTA allows one multiply
    (:func:`e2m1.folded_scale_bits`). Shared by the WGMMA and the ``mma.sync`` kernel.
    """
    if form == "word":
        halves_126 = e2m1.times_two_pow_minus_126_words(packed, layout)
        if fold:
            factor = scale(e2m1.folded_scale_bits)
            return tuple(h * factor for h in halves_126)
        # 2**126 before the scale: a subnormal times a scale below 1 would lose bits.
        factor = scale(e2m1.scale_bits)
        return tuple(h * e2m1.TWO_POW_126 * factor for h in halves_126)
    factor = scale(e2m1.scale_bits)
    wide = packed.astype(jnp.uint16)
    if form == "multiply":
        even, odd = (e2m1.times_two_pow_minus_126(wide, nibble) * e2m1.TWO_POW_126 for nibble in (0, 1))
    else:
        even, odd = e2m1.select_decode(wide & 0xF), e2m1.select_decode(wide >> 4)
    return even * factor, odd * factor


def epilogue_tile(accs: tuple[jax.Array, ...], bias_refs: list, weights_ref, *, row_layout: Any, column_layout: Any,
                  swiglu_limit: float) -> jax.Array:
    """The epilogue on float32 accumulator tiles ``[BLOCK_N, block_m]`` (one per half): each
    half's bias (``bias_refs``, ``[BLOCK_N]`` each, loaded in the accumulator's ``row_layout``)
    added in bf16, the clamped SwiGLU of the two halves if there are two, then the routing
    weights (``weights_ref``, ``[block_m]`` in ``column_layout``, or None) in float32, with the
    reference's rounding points. Shared by the WGMMA and the ``mma.sync`` kernel."""
    shape = accs[0].shape
    biases = [lax.broadcast_in_dim(plgpu.load(ref, layout=row_layout, optimized=False).astype(jnp.float32), shape, (0,))
              for ref in bias_refs]
    outs = [_round(_round(acc) + bias) for acc, bias in zip(accs, biases)]
    out = _clamped_swiglu(*outs, swiglu_limit) if len(outs) == 2 else outs[0]
    if weights_ref is None:
        return out
    return out * lax.broadcast_in_dim(plgpu.load(weights_ref, layout=column_layout, optimized=False), shape, (1,))


def tile_rows(rows: int, config: Config) -> int:
    """``block_m`` of a call with ``rows`` rows: the smallest power of two >= 8 holding them, at
    most ``config.block_m``."""
    return tile_rows_for(rows, config.block_m, _MIN_BLOCK_M)


def tile_rows_for(rows: int, block_m: int, minimum: int) -> int:
    """The smallest power of two >= ``minimum`` holding ``rows`` rows, at most ``block_m``."""
    return min(block_m, max(minimum, pl.next_power_of_2(rows)))


class Tasks:
    """Per-task metadata (int32 ``[num_tasks]`` each), computed in XLA.

    A task's row window starts at its group's first row rounded down to a multiple of 8 (the
    TMA copy into the swizzled activation tile needs an 8-row aligned start), plus whole
    ``block_m`` steps; rows of the window outside the group are computed and not stored.
    """

    def __init__(self, group_sizes: jax.Array, rows: int, block_m: int):
        num_experts = group_sizes.shape[0]
        sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
        ends = jnp.minimum(jnp.cumsum(sizes), rows)
        # The last pseudo-group (index num_experts) holds the rows past sum(group_sizes).
        ends = jnp.concatenate([ends, jnp.array([rows], jnp.int32)])
        starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
        aligned_starts = starts // _ROW_ALIGN * _ROW_ALIGN
        tasks_per_group = jnp.where(ends > starts, pl.cdiv(ends - aligned_starts, block_m), 0)
        task_ends = jnp.cumsum(tasks_per_group)
        # Each nonempty group spans at most size + 7 aligned rows, and
        # sum(ceil(a_i / b)) <= ceil(sum(a_i) / b) + (number of terms - 1).
        nonempty = min(num_experts + 1, rows)
        self.num_tasks = pl.cdiv(rows + (_ROW_ALIGN - 1) * nonempty, block_m) + nonempty - 1
        if self.num_tasks > _MAX_GRID_Y:
            raise ValueError(f"{rows} rows need {self.num_tasks} tasks of block_m={block_m}, more than "
                             f"the {_MAX_GRID_Y} a grid axis holds; split the call or raise block_m")
        task = jnp.arange(self.num_tasks, dtype=jnp.int32)
        # Every task against every group end at once: searchsorted's default method is a while
        # loop of binary-search steps, a serial chain of small kernels in every call.
        group = jnp.minimum(jnp.searchsorted(task_ends, task, side="right", method="compare_all"), num_experts)
        first_task = task_ends[group] - tasks_per_group[group]
        self.group = group.astype(jnp.int32)
        self.block_start = aligned_starts[group] + (task - first_task) * block_m
        # Rows [block_start + offset, block_start + offset + count) of the window are the group's.
        valid_start = jnp.maximum(self.block_start, starts[group])
        valid_end = jnp.minimum(self.block_start + block_m, ends[group])
        self.offset = jnp.clip(valid_start - self.block_start, 0, block_m)
        self.count = jnp.where(task < task_ends[-1], jnp.maximum(valid_end - valid_start, 0), 0)


def _store_rows(o_smem, o_gmem, block_start, offset, count, col_start, max_rows: int) -> None:
    """Copy rows ``[offset, offset + count)`` of ``o_smem`` to the same rows from ``block_start``.

    TMA boxes are static, so the count is decomposed into powers of two.
    """
    size = 1 << (max_rows.bit_length() - 1)
    while size:

        @pl.when((count & size) != 0)
        def _store(offset=offset, size=size):
            plgpu.copy_smem_to_gmem(
                o_smem.at[pl.ds(offset, size)],
                o_gmem.at[pl.ds(block_start + offset, size), pl.ds(col_start, BLOCK_N)],
                commit_group=False,
            )

        offset = offset + (count & size)
        size //= 2
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


class ExpertOperands(NamedTuple):
    """A call's operands as both expert kernels read them (:func:`expert_operands`).

    Attributes:
      halves: 2 for ``bias_swiglu`` (gate and linear rows), else 1.
      out_n: output features, ``N / halves``.
      k_steps: pipeline steps along K, ``K/2 / block_kb``.
      block_m: the call's row tile.
      out_dtype: float32 with routing weights, else bfloat16.
      lhs_even, lhs_odd: bf16 ``[padded rows, K/2]``, the even and odd columns of the rows,
        padded by ``block_m`` rows (to a multiple of 8) so a window from any row stays in bounds.
      packed: uint8 ``[E, N/h, h, K/2]``: gate (even) and linear (odd) rows as strided views of
        the same bytes.
      scales: uint8 ``[E, N/h, h, K/32]``, the same view of the scales.
      bias: bf16 ``[E, N/h, h]``.
      row_weights: float32 ``[padded rows]``, or None.
    """

    halves: int
    out_n: int
    k_steps: int
    block_m: int
    out_dtype: jnp.dtype
    lhs_even: jax.Array
    lhs_odd: jax.Array
    packed: jax.Array
    scales: jax.Array
    bias: jax.Array
    row_weights: jax.Array | None


def expert_operands(lhs: jax.Array, group_sizes: jax.Array, blocks: jax.Array, scales: jax.Array, bias: jax.Array,
                    *, epilogue: Epilogue, row_weights: jax.Array | None, block_kb: int, block_m: int) -> ExpertOperands:
    """Check a call's operands (the contract of :func:`mxfp4_grouped_matmul`) and prepare them
    for a kernel with ``block_kb``-byte K steps and ``block_m``-row tiles: one XLA fusion reads
    ``[rows, K]`` once for the even and odd columns; the rest are free reshapes."""
    rows, k = lhs.shape
    num_experts, n, k_blocks, block_bytes = blocks.shape
    if lhs.dtype != jnp.bfloat16:
        raise NotImplementedError(f"lhs must be bfloat16, got {lhs.dtype}")
    if block_bytes != _BYTES_PER_SCALE or k_blocks * mxfp4.BLOCK_SIZE != k:
        raise ValueError(f"blocks {blocks.shape} do not match lhs {lhs.shape}")
    if scales.shape != (num_experts, n, k_blocks) or bias.shape != (num_experts, n):
        raise ValueError(
            f"scales {scales.shape} / bias {bias.shape} do not match blocks {blocks.shape}"
        )
    if group_sizes.shape != (num_experts,):
        raise ValueError(f"group_sizes {group_sizes.shape} must be [{num_experts}]")
    if epilogue not in ("bias", "bias_swiglu"):
        raise ValueError(f"unknown epilogue {epilogue!r}")
    halves = 2 if epilogue == "bias_swiglu" else 1
    out_n = n // halves
    if out_n % BLOCK_N:
        raise NotImplementedError(f"output features {out_n} must be a multiple of {BLOCK_N}")
    half_k = k // 2
    if half_k % block_kb:
        raise NotImplementedError(f"K/2={half_k} must be a multiple of block_kb={block_kb}")
    # (The TMA descriptor's row count must be a multiple of the 8-row smem tiling.)
    padded_rows = pl.cdiv(rows + block_m, _ROW_ALIGN) * _ROW_ALIGN
    pad = ((0, padded_rows - rows), (0, 0))
    weights = None if row_weights is None else jnp.pad(row_weights.astype(jnp.float32), (0, padded_rows - rows))
    return ExpertOperands(
        halves=halves,
        out_n=out_n,
        k_steps=half_k // block_kb,
        block_m=block_m,
        out_dtype=jnp.float32 if row_weights is not None else jnp.bfloat16,
        lhs_even=jnp.pad(lhs[:, 0::2], pad),
        lhs_odd=jnp.pad(lhs[:, 1::2], pad),
        packed=blocks.reshape(num_experts, out_n, halves, half_k),
        scales=scales.reshape(num_experts, out_n, halves, k_blocks),
        bias=bias.astype(jnp.bfloat16).reshape(num_experts, out_n, halves),
        row_weights=weights,
    )


# Jitted with its options static: the model calls it with the same shapes in every layer, and
# each call would otherwise go through the whole Mosaic GPU lowering again.
@functools.partial(jax.jit, static_argnames=("epilogue", "swiglu_limit", "config", "interpret"))
def mxfp4_grouped_matmul(
    lhs: jax.Array,
    group_sizes: jax.Array,
    blocks: jax.Array,
    scales: jax.Array,
    bias: jax.Array,
    *,
    epilogue: Epilogue = "bias",
    swiglu_limit: float = SWIGLU_LIMIT,
    row_weights: jax.Array | None = None,
    config: Config | None = None,
    interpret: plgpu.InterpretGPUParams | None = None,
) -> jax.Array:
    """Grouped matmul of expert-sorted rows with MXFP4 expert weights (Pallas Mosaic GPU).

    Same contract as :func:`~pallas_kernels.mxfp4_moe_reference.mxfp4_grouped_matmul_reference`.

    Args:
      lhs: bfloat16 ``[M, K]`` rows sorted by expert.
      group_sizes: int32 ``[E]``, rows per expert, in order; rows past their sum come out as 0.
      blocks: uint8 ``[E, N, K/32, 16]``, the checkpoint's MXFP4 blocks.
      scales: uint8 ``[E, N, K/32]`` E8M0 scales, each in 1..254 (a scale byte 0, 2**-127, is
        flushed to zero; 255, NaN in E8M0, is not supported).
      bias: ``[E, N]``, rounded to bfloat16.
      epilogue: ``"bias"``, or ``"bias_swiglu"`` (interleaved clamped SwiGLU, halves N).
      swiglu_limit: the SwiGLU's clamp, the config's ``swiglu_limit`` (static: a new value
        compiles anew).
      row_weights: optional ``[M]`` routing weight of each row; when given the result is the
        float32 product ``weight * out``.
      config: tuning; ``None`` picks :class:`Config` defaults, with the interpretable forms
        (``decoded_lhs="smem"``, ``e2m1_decode="select"``) in interpret mode.
      interpret: ``plgpu.InterpretGPUParams()`` runs the kernel in Mosaic GPU interpret mode.

    Returns:
      ``[M, N]`` (``[M, N/2]`` with SwiGLU) bfloat16, or float32 with ``row_weights``.
    """
    if config is None:
        config = Config() if interpret is None else Config(decoded_lhs="smem", e2m1_decode="select")
    if interpret is not None and config.e2m1_decode == "multiply":
        raise ValueError("interpret mode runs on XLA:CPU, which flushes the subnormal bf16 of "
                         "e2m1_decode='multiply' to zero (0.5 would decode as 0); use 'select'")
    if interpret is not None and config.e2m1_decode == "word":
        raise ValueError("interpret mode cannot run the inline Mosaic GPU code of e2m1_decode='word'; "
                         "use 'select'")
    operands = expert_operands(lhs, group_sizes, blocks, scales, bias, epilogue=epilogue, row_weights=row_weights,
                               block_kb=config.block_kb, block_m=tile_rows(lhs.shape[0], config))
    halves, block_m, block_kb, out_n = operands.halves, operands.block_m, config.block_kb, operands.out_n
    num_experts, k_blocks = blocks.shape[0], blocks.shape[2]
    stages = min(config.max_concurrent_steps, operands.k_steps)
    smem_bytes = stages * (halves * BLOCK_N * block_kb + 2 * block_m * block_kb * 2)
    smem_bytes += block_m * BLOCK_N * jnp.dtype(operands.out_dtype).itemsize
    if config.decoded_lhs == "smem":
        smem_bytes += 2 * halves * BLOCK_N * block_kb * 2
    # A CTA's scales, [BLOCK_N, halves, K/32] contiguous in the checkpoint, as 128-byte TMA rows.
    scale_rows = halves * BLOCK_N * k_blocks // _SCALE_ROW_BYTES
    if config.scale_source == "smem":
        if scale_rows > _MAX_TMA_BOX:
            raise NotImplementedError(f"K={lhs.shape[1]} has more scales per tile than one TMA copies; "
                                      "use scale_source='global'")
        smem_bytes += scale_rows * _SCALE_ROW_BYTES
    if smem_bytes > _SMEM_BYTES:
        raise ValueError(f"{config} needs {smem_bytes} bytes of shared memory, more than {_SMEM_BYTES}")
    tasks = Tasks(group_sizes, lhs.shape[0], block_m)
    if config.scale_source == "smem":
        scales_h = scales.reshape(num_experts, out_n // BLOCK_N, scale_rows, _SCALE_ROW_BYTES)
        scale_scratch = dict(scales_smem=plgpu.SMEM((scale_rows, _SCALE_ROW_BYTES), jnp.uint8),
                             scales_barrier=plgpu.Barrier(num_arrivals=1))
    else:
        scales_h = operands.scales
        scale_scratch = {}

    kernel = functools.partial(
        _kernel,
        num_experts=num_experts,
        halves=halves,
        block_m=block_m,
        block_kb=block_kb,
        k_steps=operands.k_steps,
        stages=stages,
        config=config,
        apply_weights=row_weights is not None,
        swiglu_limit=swiglu_limit,
        interpret=interpret is not None,
    )
    # The output tile stays linear (unswizzled): its TMA stores start at any row (see
    # _store_rows), and a swizzled tile sliced off an 8-row boundary would start mid-pattern.
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((lhs.shape[0], out_n), operands.out_dtype),
        grid=(tasks.num_tasks, out_n // BLOCK_N),
        grid_names=("task", "n"),
        scratch_types=dict(o_smem=plgpu.SMEM((block_m, BLOCK_N), operands.out_dtype), **scale_scratch),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup
        ),
        interpret=interpret,
    )
    args = [tasks.group, tasks.block_start, tasks.offset, tasks.count]
    args += [operands.lhs_even, operands.lhs_odd, operands.packed, scales_h, operands.bias]
    if row_weights is not None:
        args.append(operands.row_weights)
    return call(*args)


def _load_scale_columns(scales_smem, halves: int, columns: pl.Slice, *, interpret: bool) -> list[jax.Array]:
    """Each accumulator row's scales of K/32 blocks ``columns`` from a CTA's scales in shared
    memory (``[BLOCK_N, halves, K/32]`` bytes, as TMA rows): ``halves * columns.size`` uint8
    ``[BLOCK_N]`` vectors in the accumulator's row layout, half-major.

    Mosaic GPU's layout inference refuses a strided view of shared memory (a column's rows are
    90 or 180 bytes apart), so on the GPU the loads are written in inline Mosaic GPU code on the
    (innermost-contiguous) view of the step's columns; interpret mode, which runs neither layout
    inference nor inline code (nor reshapes of a ref), takes the same elements from the loaded
    tile.
    """
    shape = (BLOCK_N, halves, scales_smem.size // (BLOCK_N * halves))
    if interpret:
        step_scales = lax.dynamic_slice_in_dim(scales_smem[...].reshape(shape), columns.start, columns.size, axis=2)
        return [step_scales[:, half, s] for half in range(halves) for s in range(columns.size)]
    row_vector = plgpu.ShapeDtypeStruct((BLOCK_N,), jnp.uint8, layout=_ROW)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=[row_vector] * (halves * columns.size))
    def load(_, step_scales):
        return [mgpu.FragmentedArray.load_untiled(mgpu.utils.memref_slice(step_scales, (slice(None), half, s)),
                                                  layout=mgpu.WGMMA_ROW_LAYOUT, is_signed=False, optimized=False)
                for half in range(halves) for s in range(columns.size)]

    return load(scales_smem.reshape(shape).at[:, :, columns])


def _kernel(
    group_gmem,
    block_start_gmem,
    offset_gmem,
    count_gmem,
    lhs_even_gmem,
    lhs_odd_gmem,
    packed_gmem,
    scales_gmem,
    bias_gmem,
    *weights_and_out,
    o_smem,
    scales_smem=None,
    scales_barrier=None,
    num_experts: int,
    halves: int,
    block_m: int,
    block_kb: int,
    k_steps: int,
    stages: int,
    config: Config,
    apply_weights: bool,
    swiglu_limit: float,
    interpret: bool,
):
    *maybe_weights_gmem, out_gmem = weights_and_out
    task = lax.axis_index("task")
    n_tile = lax.axis_index("n")
    n_start = n_tile * BLOCK_N
    expert = group_gmem[task]
    block_start = pl.multiple_of(block_start_gmem[task], _ROW_ALIGN)
    offset = offset_gmem[task]
    count = count_gmem[task]
    rows = pl.ds(block_start, block_m)
    n_rows = pl.ds(n_start, BLOCK_N)
    scales_per_step = block_kb // _BYTES_PER_SCALE
    # Activation tiles and decoded weight tiles (smem variant) are bf16 [rows, block_kb].
    bf16_tile = _swizzled(jnp.bfloat16, plgpu.find_swizzle(block_kb * 16, "lhs"))

    def load_scales(step):
        """uint16 scale bytes per accumulator row, for every half and 16-byte slice of a step."""
        if scales_smem is None:
            scale_bytes = [plgpu.load(scales_gmem.at[expert, n_rows, half, step * scales_per_step + s],
                                      layout=_ROW, optimized=False)
                           for half in range(halves) for s in range(scales_per_step)]
        else:
            columns = pl.ds(step * scales_per_step, scales_per_step)
            scale_bytes = _load_scale_columns(scales_smem, halves, columns, interpret=interpret)
        return tuple(b.astype(jnp.uint16) for b in scale_bytes)

    def scale_tile(scale_bytes, to_bf16):
        """``[BLOCK_N, block_kb]``: each row's scales, each over its 16-column slice."""
        slices = [lax.broadcast_in_dim(to_bf16(s), (BLOCK_N, _BYTES_PER_SCALE), (0,)) for s in scale_bytes]
        return jnp.concatenate(slices, axis=1)

    def decoded_tiles(w_smem, scale_bytes, fold: bool):
        """The even-K and odd-K bf16 halves of one scaled weight tile: 2 x [BLOCK_N, block_kb]."""
        return decode_packed(w_smem[...], functools.partial(scale_tile, scale_bytes), config.e2m1_decode,
                             fold=fold, layout=plgpu.Layout.WGMMA)

    # Folding 2**126 into the scales needs all of a CTA's scales at hand: those in shared memory.
    folds = config.fold_scales and config.e2m1_decode == "word" and scales_smem is not None

    def compute(*accs):
        def body(step, refs, lhs_smems, scales, fold: bool):
            if scales_smem is not None:
                if not folds:  # the scales' TMA was waited for before the pipeline otherwise
                    @pl.when(step == 0)
                    def _wait_for_scales():
                        plgpu.barrier_wait(scales_barrier)

                scales = load_scales(step)
            w_smems = refs[:halves]
            x_even, x_odd = refs[halves:]
            for half, (acc, w_smem) in enumerate(zip(accs, w_smems)):
                half_scales = scales[half * scales_per_step : (half + 1) * scales_per_step]
                even, odd = decoded_tiles(w_smem, half_scales, fold)
                if config.decoded_lhs == "registers":
                    plgpu.wgmma(acc, even, x_even.T)
                    plgpu.wgmma(acc, odd, x_odd.T)
                else:
                    even_smem, odd_smem = lhs_smems[2 * half : 2 * half + 2]
                    even_smem[...] = even
                    odd_smem[...] = odd
                    plgpu.commit_smem()
                    plgpu.wgmma(acc, even_smem, x_even.T)
                    plgpu.wgmma(acc, odd_smem, x_odd.T)
            next_scales = None
            if scales_smem is None:
                # Per-thread global loads: the next step's are issued while this step's WGMMAs
                # run, so their latency hides behind them (the last step reloads its own).
                # Issued after the decoding, they hold no registers while the tiles are live.
                next_scales = load_scales(jnp.minimum(step + 1, k_steps - 1))
            plgpu.wgmma_wait(0)
            return next_scales

        def pipeline_body(idx, *refs_and_scales, fold: bool):
            (step,) = idx
            if scales_smem is None:
                *refs, scales = refs_and_scales
            else:
                refs, scales = refs_and_scales, None
            if config.decoded_lhs == "registers":
                return body(step, refs, (), scales, fold)
            lhs_scratch = [plgpu.SMEM((BLOCK_N, block_kb), jnp.bfloat16, transforms=bf16_tile)]
            return pl.run_scoped(
                lambda *scratch: body(step, refs, scratch, scales, fold), *lhs_scratch * (2 * halves)
            )

        if scales_smem is not None:
            # Issued before the pipeline's first weight copies; without folding, waited for in
            # its first step, so that the two latencies overlap.
            plgpu.copy_gmem_to_smem(scales_gmem.at[expert, n_tile], scales_smem, scales_barrier)
        w_spec = plgpu.BlockSpec((BLOCK_N, block_kb), lambda kk: (0, kk))
        x_spec = plgpu.BlockSpec((block_m, block_kb), lambda kk: (0, kk), transforms=bf16_tile)

        def pipeline(fold: bool) -> None:
            plgpu.emit_pipeline(
                functools.partial(pipeline_body, fold=fold),
                grid=(k_steps,),
                in_specs=[w_spec] * halves + [x_spec, x_spec],
                max_concurrent_steps=stages,
                init_carry=load_scales(0) if scales_smem is None else None,
            )(
                *[packed_gmem.at[expert, n_rows, half] for half in range(halves)],
                lhs_even_gmem.at[rows],
                lhs_odd_gmem.at[rows],
            )

        if folds:
            # One pipeline or the other for the whole CTA, so neither loop branches; the price
            # is the scales' copy no longer overlapping the first weight copies.
            plgpu.barrier_wait(scales_barrier)
            foldable = e2m1.scales_fold(scales_smem[...])
            pl.when(foldable)(lambda: pipeline(fold=True))
            pl.when(~foldable)(lambda: pipeline(fold=False))
        else:
            pipeline(fold=False)
        return tuple(acc[...] for acc in accs)

    def store(out: jax.Array) -> None:
        o_smem.T[...] = plgpu.layout_cast(out.astype(o_smem.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.commit_smem()
        _store_rows(o_smem, out_gmem, block_start, offset, count, n_start, block_m)

    @pl.when((count > 0) & (expert < num_experts))
    def _matmul():
        accs = pl.run_scoped(compute, *[plgpu.ACC((BLOCK_N, block_m))] * halves)
        bias_refs = [bias_gmem.at[expert, n_rows, half] for half in range(halves)]
        weights_ref = maybe_weights_gmem[0].at[rows] if apply_weights else None
        store(epilogue_tile(accs, bias_refs, weights_ref, row_layout=_ROW, column_layout=_COL,
                            swiglu_limit=swiglu_limit))

    @pl.when((count > 0) & (expert == num_experts))
    def _zeros():
        store(plgpu.layout_cast(jnp.zeros((BLOCK_N, block_m), jnp.float32), plgpu.Layout.WGMMA))
