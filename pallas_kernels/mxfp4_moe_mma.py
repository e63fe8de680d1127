"""MXFP4 grouped expert matmul on ``mma.sync`` (Pallas Mosaic GPU): Ampere, Ada, Hopper, Blackwell.

Computes what :func:`pallas_kernels.mxfp4_moe_reference.mxfp4_grouped_matmul_reference` computes,
as :mod:`pallas_kernels.mxfp4_moe` does on Hopper, with the instructions every NVIDIA GPU from
the A100 on has: warp-level ``mma.sync.m16n8k16`` (``plgpu.mma``) instead of WGMMA, and the
pipeline's copies as ``cp.async`` on GPUs before Hopper (Mosaic GPU picks them for compute
capability < 9.0; on Hopper the same kernel copies with TMA). Blackwell (sm_100, sm_120) has no
WGMMA, so this is the expert kernel there too.

What it shares with the WGMMA kernel (:mod:`pallas_kernels.mxfp4_moe`): the tasks (row windows
of one expert's group, :class:`~pallas_kernels.mxfp4_moe.Tasks`), the operands' preparation
(activations split into even and odd columns, gate and linear rows as strided views of the
same bytes), the nibble decoding (:mod:`pallas_kernels.e2m1`'s word decode, in the ``mma.sync``
operand layout instead of WGMMA's), and the epilogues (bias, clamped SwiGLU, routing weight)
with the reference's rounding points.

What differs, and why:

* **Operand layouts.** One warpgroup (4 warps) computes a ``[64 weight rows, block_m tokens]``
  accumulator, each warp 16 weight rows (``MMALayouts`` with ``m_warps=4``): swap A/B as on
  Hopper, so decode-sized groups need a small N side only. A step's packed weight bytes come
  from the swizzled shared-memory tile straight into ``mma.sync``'s A-fragment layout (2
  adjacent bytes per register), where the word decode turns each register into one bf16x2 word
  of each K half; the activations are read as the B fragments of the transposed tile.
* **Scales from global memory, unfolded.** A step's scales are loaded per thread (2 weight rows
  a thread, two scale bytes a load), one step ahead: ``cp.async`` has no copy of the 90-byte-strided scale rows, and TMA
  (the WGMMA kernel's ``scale_source="smem"``) does not exist before Hopper. The WGMMA kernel's
  folding of 2**126 into the scales is left out: the decoding costs about 0.03 warp
  instructions per weight byte here against the 1.3 an RTX 4090's bandwidth leaves
  (``benchmarks.kernels.kernel_cost``), and the second pipeline it needs makes Mosaic GPU's layout
  inference 5 times slower.
* **Row tile of at least 16.** Pre-Hopper copies (``cp.async``) into the 8-row swizzled tiles
  split a tile's 8-row blocks over the 4 warps: a bf16 activation tile of ``block_kb = 96``
  bytes (3 rows of the 32-byte swizzle) needs 2 row blocks or more. The extra rows at decode
  (1 or 2 rows per expert) cost ``mma.sync`` issue slots only.
* **Output through XLA.** Pre-Hopper GPUs have no TMA stores, and a task's rows are ragged. Each
  task writes its whole ``[64, block_m]`` tile, transposed as the accumulator holds it, to its own
  slab of a ``[tasks, N, block_m]`` buffer with plain vector stores; one XLA gather then takes
  each row from its task (rows past the groups come out as 0). At decode sizes the buffer is a
  few hundred KB beside tens of MB of weights.
* **Shared memory for 2 CTAs an SM.** Ada and consumer Blackwell SMs have 100 KB of shared
  memory: 2 pipeline stages (37 KB for mlp1) let 2 CTAs share an SM, so gpt-oss-20b's 180
  decode CTAs run in one wave on an RTX 4090, where 4 stages (74 KB) would need two.

Interpret mode (``interpret=plgpu.InterpretGPUParams()``) runs everything except ``mma.sync``
(the interpreter has no rule for it) and the inline word decode: there the product is a float32
``jnp.dot`` of the same operands (exact products, float32 sums like the MMA's) and the decode
is ``"select"`` (:attr:`Config.e2m1_decode`), the WGMMA kernel's interpretable forms.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mxfp4
from pallas_kernels.mxfp4_moe import BLOCK_N, Tasks, decode_packed, epilogue_tile, expert_operands, tile_rows_for
from pallas_kernels.mxfp4_moe_reference import SWIGLU_LIMIT, Epilogue

_MIN_BLOCK_M = 16  # cp.async's 8-row tiles of a 96-byte bf16 activation tile: see the docstring
_ROW_ALIGN = 8  # Tasks start their windows on multiples of 8 rows
# The shared-memory tiles' swizzle (bytes): pre-Hopper copies split a bf16 activation tile's
# 8-row blocks over the 4 warps, so with 16 rows its 96 bytes of K must span an even number of
# swizzle rows; 32 is Mosaic GPU's smallest swizzle.
_SWIZZLE = 32
_SMEM_BYTES = 99 * 1024  # per block on sm_86 / sm_89 / sm_120 (sm_80 and sm_90 allow more)
_WEIGHTS = plgpu.Layout.MMA_LHS(jnp.bfloat16)  # [64, k]: also the packed bytes', 2 per register
_ACTIVATIONS = plgpu.Layout.MMA_RHS(jnp.bfloat16)  # [k, block_m]
_ACC = plgpu.Layout.MMA_ACC(jnp.bfloat16)  # [64, block_m]
_WEIGHT_ROW = _WEIGHTS.reduce(1)  # [64]: one value per weight row, as the A fragments hold them
_ACC_ROW = _ACC.reduce(1)  # [64]
_ACC_COL = _ACC.reduce(0)  # [block_m]


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning knobs of :func:`mxfp4_grouped_matmul_mma`.

    Attributes:
      block_m: the most rows (tokens) one tile holds: a multiple of 16, at most 128. A call with
        fewer rows uses the smallest power of two >= 16 that holds them.
      block_kb: packed bytes of K per pipeline step (2 * block_kb weight columns); a multiple of
        32 dividing K/2 (96 for gpt-oss's 1440).
      max_concurrent_steps: pipeline depth (copies in flight); 2 lets 2 CTAs share an SM of
        100 KB shared memory (the module docstring).
      e2m1_decode: ``"word"`` (the GPU default) or ``"select"`` (integer operations only:
        interpret mode's), as :attr:`pallas_kernels.mxfp4_moe.Config.e2m1_decode`.
    """

    block_m: int = 64
    block_kb: int = 96
    max_concurrent_steps: int = 2
    e2m1_decode: Literal["word", "select"] = "word"

    def __post_init__(self):
        if self.block_m % _MIN_BLOCK_M or not _MIN_BLOCK_M <= self.block_m <= 128:
            raise ValueError(f"block_m={self.block_m} must be a multiple of 16 in [16, 128]")
        if self.block_kb % 32:
            raise ValueError(f"block_kb={self.block_kb} must be a multiple of 32")
        if self.max_concurrent_steps < 1:
            raise ValueError("max_concurrent_steps must be positive")
        if self.e2m1_decode not in ("word", "select"):
            raise ValueError(f"e2m1_decode={self.e2m1_decode!r} must be 'word' or 'select'")


def tile_rows(rows: int, config: Config) -> int:
    """``block_m`` of a call with ``rows`` rows: the smallest power of two >= 16 holding them, at
    most ``config.block_m``."""
    return tile_rows_for(rows, config.block_m, _MIN_BLOCK_M)


# Jitted with its options static, like the WGMMA kernel: every layer calls it with the same shapes.
@functools.partial(jax.jit, static_argnames=("epilogue", "swiglu_limit", "config", "interpret"))
def mxfp4_grouped_matmul_mma(
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
    """Grouped matmul of expert-sorted rows with MXFP4 expert weights, on ``mma.sync``.

    Same contract, arguments and result as :func:`pallas_kernels.mxfp4_moe.mxfp4_grouped_matmul`
    (``lhs [M, K]`` bfloat16 rows sorted by expert, ``blocks [E, N, K/32, 16]``, ``scales
    [E, N, K/32]``, ``bias [E, N]``; ``[M, N]``, or ``[M, N/2]`` with SwiGLU, bfloat16 or float32
    with ``row_weights``), but for ``config``: this kernel's :class:`Config`; ``None`` picks its
    defaults, with ``e2m1_decode="select"`` in interpret mode.
    """
    if config is None:
        config = Config() if interpret is None else Config(e2m1_decode="select")
    if interpret is not None and config.e2m1_decode == "word":
        raise ValueError("interpret mode cannot run the inline Mosaic GPU code of e2m1_decode='word'; "
                         "use 'select'")
    operands = expert_operands(lhs, group_sizes, blocks, scales, bias, epilogue=epilogue,
                               row_weights=row_weights, block_kb=config.block_kb,
                               block_m=tile_rows(lhs.shape[0], config))
    halves, block_m = operands.halves, operands.block_m
    stages = min(config.max_concurrent_steps, operands.k_steps)
    smem_bytes = stages * (halves * BLOCK_N * config.block_kb + 2 * block_m * config.block_kb * 2)
    if smem_bytes > _SMEM_BYTES:
        raise ValueError(f"{config} needs {smem_bytes} bytes of shared memory, more than {_SMEM_BYTES}")
    rows, out_n = lhs.shape[0], operands.out_n
    tasks = Tasks(group_sizes, rows, block_m)
    num_experts = blocks.shape[0]
    kernel = functools.partial(
        _kernel,
        num_experts=num_experts,
        halves=halves,
        block_m=block_m,
        block_kb=config.block_kb,
        k_steps=operands.k_steps,
        stages=stages,
        config=config,
        apply_weights=row_weights is not None,
        swiglu_limit=swiglu_limit,
        interpret=interpret is not None,
    )
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((tasks.num_tasks, out_n, block_m), operands.out_dtype),
        grid=(tasks.num_tasks, out_n // BLOCK_N),
        grid_names=("task", "n"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    packed = operands.packed.reshape(num_experts, out_n, -1)  # [E, N/h, h * K/2]
    # Scale byte pairs [E, N/h, h, K/64] (K/32 is even: K/2 is a multiple of block_kb): half the
    # loads, each still one byte's worth of L1 wavefronts.
    scale_pairs = lax.bitcast_convert_type(operands.scales.reshape(*operands.scales.shape[:-1], -1, 2), jnp.uint16)
    args = [tasks.group, tasks.block_start, tasks.count, operands.lhs_even, operands.lhs_odd,
            packed, scale_pairs, operands.bias]
    if row_weights is not None:
        args.append(operands.row_weights)
    per_task = call(*args)
    return _rows_of_tasks(per_task, tasks, group_sizes, rows)


def _rows_of_tasks(per_task: jax.Array, tasks: Tasks, group_sizes: jax.Array, rows: int) -> jax.Array:
    """``[rows, N]`` from the tasks' ``[tasks, N, block_m]`` tiles: each row from the one task that
    owns it (:class:`Tasks`' ``offset``/``count``), rows past the groups 0."""
    num_tasks, _, block_m = per_task.shape
    window = jnp.arange(block_m, dtype=jnp.int32)
    owned = (window >= tasks.offset[:, None]) & (window < (tasks.offset + tasks.count)[:, None])
    # Where each row's tile column is: task * block_m + column; unowned columns go nowhere.
    targets = jnp.where(owned, tasks.block_start[:, None] + window, rows)
    source = jnp.zeros((rows,), jnp.int32).at[targets.reshape(-1)].set(
        jnp.arange(num_tasks * block_m, dtype=jnp.int32), mode="drop")
    columns = per_task.transpose(0, 2, 1).reshape(num_tasks * block_m, -1)
    in_groups = jnp.arange(rows) < jnp.sum(jnp.maximum(group_sizes, 0))
    return jnp.where(in_groups[:, None], columns[source], 0).astype(per_task.dtype)


def _kernel(
    group_gmem,
    block_start_gmem,
    count_gmem,
    lhs_even_gmem,
    lhs_odd_gmem,
    packed_gmem,
    scales_gmem,
    bias_gmem,
    *weights_and_out,
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
    n_rows = pl.ds(n_tile * BLOCK_N, BLOCK_N)
    expert = group_gmem[task]
    rows = pl.ds(pl.multiple_of(block_start_gmem[task], _ROW_ALIGN), block_m)
    blocks = block_kb // mxfp4.BYTES_PER_BLOCK  # scale blocks of a step, per half

    def load_scales(step):
        """uint16 ``[64]`` scale bytes of every half and 16-byte slice of a step, half-major: each
        thread loads its rows' scales two blocks at a time (``scales_gmem`` holds byte pairs)."""
        pairs = [plgpu.load(scales_gmem.at[expert, n_rows, half, step * blocks // 2 + p],
                            layout=_WEIGHT_ROW, optimized=False)
                 for half in range(halves) for p in range(blocks // 2)]
        return tuple(byte for pair in pairs for byte in (pair & 0xFF, pair >> 8))  # little-endian

    def product(acc, weights, activations):
        if interpret:  # the interpreter has no mma.sync; the same float32 sum of exact products
            return acc + jnp.dot(weights, activations, preferred_element_type=jnp.float32)
        return plgpu.mma(acc, weights, activations)

    def compute() -> tuple[jax.Array, ...]:
        def body(idx, *refs_and_carry):
            (step,) = idx
            *refs, (accs, scales) = refs_and_carry
            w_smems, (x_even, x_odd) = refs[:halves], refs[halves:]
            accs = list(accs)
            activations = [plgpu.load(x.T, layout=_ACTIVATIONS, optimized=False) for x in (x_even, x_odd)]
            for half, w_smem in enumerate(w_smems):
                packed = plgpu.load(w_smem, layout=_WEIGHTS, optimized=False)
                scale_bytes = scales[half * blocks : (half + 1) * blocks]
                decoded = decode_packed(packed, functools.partial(_scale_tile, scale_bytes), config.e2m1_decode,
                                        fold=False, layout=_WEIGHTS)
                for weights, x in zip(decoded, activations):
                    accs[half] = product(accs[half], weights, x)
            # The next step's scales load while this step's products run (the last reloads its own).
            return tuple(accs), load_scales(jnp.minimum(step + 1, k_steps - 1))

        # A weight row's halves side by side, [BLOCK_N, halves * K/2] (gate bytes, then linear),
        # one spec per half: cp.async's tiled copies take 2-D slices only.
        w_specs = [plgpu.BlockSpec((BLOCK_N, block_kb), lambda kk, half=half: (0, half * k_steps + kk),
                                   transforms=_swizzled(jnp.uint8, _SWIZZLE)) for half in range(halves)]
        x_spec = plgpu.BlockSpec((block_m, block_kb), lambda kk: (0, kk), transforms=_swizzled(jnp.bfloat16, _SWIZZLE))
        zeros = plgpu.layout_cast(jnp.zeros((BLOCK_N, block_m), jnp.float32), _ACC)
        accs, _ = plgpu.emit_pipeline(
            body,
            grid=(k_steps,),
            in_specs=[*w_specs, x_spec, x_spec],
            max_concurrent_steps=stages,
            init_carry=((zeros,) * halves, load_scales(0)),
        )(
            *[packed_gmem.at[expert, n_rows]] * halves,
            lhs_even_gmem.at[rows],
            lhs_odd_gmem.at[rows],
        )
        return accs

    def epilogue(accs: tuple[jax.Array, ...]) -> None:
        bias_refs = [bias_gmem.at[expert, n_rows, half] for half in range(halves)]
        weights_ref = maybe_weights_gmem[0].at[rows] if apply_weights else None
        out = epilogue_tile(accs, bias_refs, weights_ref, row_layout=_ACC_ROW, column_layout=_ACC_COL,
                            swiglu_limit=swiglu_limit)
        out_gmem.at[task, n_rows][...] = out.astype(out_gmem.dtype)

    @pl.when((count_gmem[task] > 0) & (expert < num_experts))
    def _matmul():
        epilogue(compute())


def _scale_tile(scale_bytes: tuple[jax.Array, ...], to_bf16) -> jax.Array:
    """``[BLOCK_N, block_kb]``: each weight row's scales (uint16 ``[BLOCK_N]`` each), each over its 16
    columns, turned into bf16 by ``to_bf16``."""
    blocks = [lax.broadcast_in_dim(to_bf16(s), (BLOCK_N, mxfp4.BYTES_PER_BLOCK), (0,)) for s in scale_bytes]
    return jnp.concatenate(blocks, axis=1)


def _swizzled(dtype: jnp.dtype, swizzle: int) -> tuple[plgpu.TilingTransform, plgpu.SwizzleTransform]:
    bits = jnp.dtype(dtype).itemsize * 8
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)
