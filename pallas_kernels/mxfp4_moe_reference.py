"""Plain-XLA reference of the MXFP4 grouped expert matmul: dequantize, then dot.

This is the path the model takes where the Pallas kernel does not run (CPU, or when forced),
and the oracle the kernel is tested against. Its rounding points follow OpenAI's torch
reference: in ``bfloat16`` the matmul output, the bias add and every SwiGLU operation round to
bfloat16; the routing weight multiplies in float32 so the per-token sum rounds once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import mxfp4
from pallas_kernels.expert_routing import expert_of_rows

SWIGLU_LIMIT = 7.0  # gpt-oss's; a config may set another (``swiglu_limit``)
SWIGLU_ALPHA = 1.702
# The expert kernel rounds to bfloat16 where this reference does: only the float32 summation
# order (and, for SwiGLU, the last bit of exp) differ, so its results agree to one bf16 ulp,
# nearly all exactly. The kernel tests and the first-use check (gptoss_jax.kernel_check) hold it to these.
KERNEL_RTOL = 2**-7
KERNEL_EXACT_FRACTION = 0.99

Epilogue = Literal["bias", "bias_swiglu"]

# Bounds of the row tile of the many-rows path: small tiles waste little on padding but run
# more, smaller matmuls.
_MIN_ROW_TILE = 16
_MAX_ROW_TILE = 512


def clamped_swiglu(
    gate_up: jax.Array, limit: float = SWIGLU_LIMIT, alpha: float = SWIGLU_ALPHA
) -> jax.Array:
    """gpt-oss's activation on interleaved ``[..., 2 * I]`` (gate even, linear odd) -> ``[..., I]``.

    ``min(gate, limit) * sigmoid(alpha * gate) * (clip(linear, -limit, limit) + 1)``, with every
    operation in the input dtype (the torch reference rounds each one to bfloat16).
    """
    gate = jnp.minimum(gate_up[..., 0::2], limit)
    linear = jnp.clip(gate_up[..., 1::2], -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (linear + 1)


def _epilogue(
    product: jax.Array, bias: jax.Array, epilogue: Epilogue, dtype: jnp.dtype, swiglu_limit: float
) -> jax.Array:
    """Round the float32 ``product [M, N]``, add ``bias`` (``[N]`` or ``[M, N]``), then SwiGLU if asked."""
    out = product.astype(dtype) + bias.astype(dtype)
    return clamped_swiglu(out, swiglu_limit) if epilogue == "bias_swiglu" else out


FewRowsForm = Literal["per_row", "by_expert"]


def few_rows_product(
    lhs: jax.Array, expert: jax.Array, weights_of: Callable[[jax.Array], jax.Array], num_experts: int,
    *, form: FewRowsForm,
) -> jax.Array:
    """float32 ``[M, N]``: each row of ``lhs [M, K]`` times the weights of its ``expert [M]``.

    ``weights_of`` maps an expert index to its ``[N, K]`` weights. A row whose expert is
    ``num_experts`` or more (past the groups) comes out as 0 in the ``by_expert`` form and is
    clamped to the last expert in the ``per_row`` form (the caller masks it).

    ``form``:

    * ``per_row``: one matrix-vector product per row, decoding its expert each time. For XLA's
      CPU backend, where it is the fastest form (``python -m benchmarks.throughput.moe_reference``).
    * ``by_expert``: a loop over the distinct experts of the rows, each decoded once and
      multiplied by every row, its own rows kept. One expert's weights are live at a time, where
      a gather of every row's weights holds ``[M, N, K]`` (on an RTX 4090 at gpt-oss-20b's mlp1
      and 8 tokens, 1.08 GB of temporaries for one matmul): the form for GPUs.
    """
    rows = lhs.shape[0]
    if form == "per_row":
        clamped = jnp.minimum(expert, num_experts - 1)
        return jax.lax.map(
            lambda row_and_expert: jnp.dot(weights_of(row_and_expert[1]), row_and_expert[0],
                                           preferred_element_type=jnp.float32),
            (lhs, clamped),
        )
    used = jnp.zeros(num_experts, jnp.bool_).at[expert].set(True, mode="drop")
    distinct = jnp.nonzero(used, size=min(rows, num_experts), fill_value=0)[0]

    def one_expert(index: jax.Array, out: jax.Array) -> jax.Array:
        product = jnp.dot(lhs, weights_of(distinct[index]).T, preferred_element_type=jnp.float32)
        return jnp.where((expert == distinct[index])[:, None], product, out)

    out_features = jax.eval_shape(weights_of, distinct[0]).shape[0]
    return jax.lax.fori_loop(0, used.sum(), one_expert, jnp.zeros((rows, out_features), jnp.float32))


def _row_tile(rows: int, num_experts: int) -> int:
    """Rows per matmul of one expert: the mean group size rounded up to a power of two, so the
    tiles' padding adds at most about twice the real rows (fewer when groups are even)."""
    mean_group = -(-rows // num_experts)
    return min(rows, max(_MIN_ROW_TILE, min(_MAX_ROW_TILE, 1 << (mean_group - 1).bit_length())))


def _rows_by_expert_tiles(
    lhs: jax.Array, group_sizes: jax.Array, bias: jax.Array, weights_of: Callable[[jax.Array], jax.Array],
    epilogue: Epilogue, out_features: int, swiglu_limit: float,
) -> jax.Array:
    """Many rows (prefill): each expert in turn, over its own rows only, a fixed-size tile at a time.

    A tile that starts inside one expert's rows may run past them, into the next experts' rows
    (written again when their turn comes, experts go in order) or past the groups (zeroed at
    the end). So the matmuls cover at most ``rows + experts * tile`` rows, where multiplying
    every row by every expert would cover ``rows * experts``, and each tile is a plain write.
    """
    rows = lhs.shape[0]
    tile = _row_tile(rows, group_sizes.shape[0])
    group_ends = jnp.cumsum(group_sizes)
    group_starts = group_ends - group_sizes
    # A tile of room past the last row, so that no tile has to be moved back to fit.
    padded_lhs = jnp.pad(lhs, ((0, tile), (0, 0)))

    def expert_rows(out: jax.Array, expert: jax.Array) -> tuple[jax.Array, None]:
        start, end = group_starts[expert], group_ends[expert]

        def compute(out: jax.Array) -> jax.Array:
            weights = weights_of(expert)  # decoded once for all its tiles

            def tile_rows(index: jax.Array, out: jax.Array) -> jax.Array:
                first = start + index * tile
                product = jnp.dot(jax.lax.dynamic_slice_in_dim(padded_lhs, first, tile), weights.T,
                                  preferred_element_type=jnp.float32)
                tile_out = _epilogue(product, bias[expert], epilogue, lhs.dtype, swiglu_limit)
                return jax.lax.dynamic_update_slice_in_dim(out, tile_out, first, 0)

            return jax.lax.fori_loop(0, (end - start + tile - 1) // tile, tile_rows, out)

        # Experts without rows cost nothing, not even decoding their weights.
        return jax.lax.cond(end > start, compute, lambda out: out, out), None

    out = jnp.zeros((rows + tile, out_features), lhs.dtype)
    out, _ = jax.lax.scan(expert_rows, out, jnp.arange(group_sizes.shape[0]))
    return jnp.where((jnp.arange(rows) < group_ends[-1])[:, None], out[:rows], 0)


def mxfp4_grouped_matmul_reference(
    lhs: jax.Array,
    group_sizes: jax.Array,
    blocks: jax.Array,
    scales: jax.Array,
    bias: jax.Array,
    *,
    epilogue: Epilogue = "bias",
    swiglu_limit: float = SWIGLU_LIMIT,
    row_weights: jax.Array | None = None,
    decoded: jax.Array | None = None,
) -> jax.Array:
    """Grouped matmul of expert-sorted rows with MXFP4 expert weights.

    Args:
      lhs: ``[M, K]`` rows sorted by expert (bfloat16 or float32; sets the rounding dtype).
      group_sizes: int32 ``[E]``, rows per expert, in order; rows past their sum come out as 0.
      blocks: uint8 ``[E, N, K/32, 16]``, the checkpoint's MXFP4 blocks.
      scales: uint8 ``[E, N, K/32]``.
      bias: ``[E, N]``.
      epilogue: ``"bias"``, or ``"bias_swiglu"`` (interleaved clamped SwiGLU, halves N).
      swiglu_limit: the SwiGLU's clamp (:func:`clamped_swiglu`), the config's ``swiglu_limit``.
      row_weights: optional ``[M]`` routing weight of each row; when given the result is the
        float32 product ``weight * out`` ready for a single-rounding sum over experts.
      decoded: optional ``[E, N, K]``, the same weights already decoded to lhs.dtype
        (:func:`mxfp4.dequantize`), read instead of decoding blocks and scales at every call.

    Returns:
      ``[M, N]`` (``[M, N/2]`` with SwiGLU) in lhs.dtype, or float32 with ``row_weights``.
    """
    num_experts, n = blocks.shape[:2]
    rows = lhs.shape[0]
    out_features = n // 2 if epilogue == "bias_swiglu" else n

    def weights_of(expert: jax.Array) -> jax.Array:
        """``[N, K]`` weights of one expert in lhs.dtype."""
        if decoded is None:
            return mxfp4.dequantize(blocks[expert], scales[expert], lhs.dtype)
        return decoded[expert].astype(lhs.dtype)

    if rows <= num_experts:
        # Few rows (decode): only the experts the rows use, rather than a loop over all of them.
        row_expert = expert_of_rows(group_sizes, rows)
        expert = jnp.minimum(row_expert, num_experts - 1)
        product = jax.lax.platform_dependent(
            cpu=functools.partial(few_rows_product, lhs, row_expert, weights_of, num_experts, form="per_row"),
            default=functools.partial(few_rows_product, lhs, row_expert, weights_of, num_experts, form="by_expert"),
        )
        out = _epilogue(product, bias[expert], epilogue, lhs.dtype, swiglu_limit)
        out = jnp.where((row_expert < num_experts)[:, None], out, 0)
    else:
        out = _rows_by_expert_tiles(lhs, group_sizes, bias, weights_of, epilogue, out_features, swiglu_limit)
    if row_weights is None:
        return out
    return out.astype(jnp.float32) * row_weights.astype(jnp.float32)[:, None]
