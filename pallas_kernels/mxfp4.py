"""The MXFP4 format of gpt-oss expert weights (OCP Microscaling, E2M1 values, E8M0 scales).

A logical weight ``[..., N, K]`` is stored along its contraction axis K in blocks of 32 values
that share one power-of-two scale:

* ``blocks`` uint8 ``[..., N, K/32, 16]``: byte j of a block holds element 2j in its low nibble
  and element 2j+1 in its high nibble.
* ``scales`` uint8 ``[..., N, K/32]``: E8M0, the multiplier is ``2**(s - 127)``.

An E2M1 nibble is ``sign:1 exponent:2 mantissa:1``; its 16 values are :data:`E2M1_VALUES`.

Decoding assembles the IEEE bits of the result directly with integer operations instead of
multiplying a table value by the scale: XLA on the CPU flushes subnormal products to zero, and
assembling the bits is exact for every nibble and every scale, subnormal results included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZE = 32
"""Values per MXFP4 block (one shared scale)."""

BYTES_PER_BLOCK = BLOCK_SIZE // 2
SCALE_BIAS = 127
"""E8M0 exponent bias: a scale byte s means 2**(s - 127)."""

E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
"""The value of each E2M1 code, indexed by the 4-bit nibble."""

_E2M1_EMAX = 2  # exponent of the largest E2M1 value, 6 = 1.5 * 2**2
_SCALE_NAN = 255  # the one E8M0 code that is not a power of two
_FLOAT32_INF_BITS = 0x7F800000

_SCALE_DTYPE_MIN_EXPONENT = -SCALE_BIAS
_SCALE_DTYPE_MAX_EXPONENT = 254 - SCALE_BIAS


def unpack_nibbles(blocks: jax.Array) -> jax.Array:
    """Split packed bytes into E2M1 codes in element order.

    Args:
      blocks: uint8 ``[..., G, 16]``.

    Returns:
      uint8 ``[..., G * 32]`` codes; element 2j is the low nibble of byte j.
    """
    low = blocks & 0x0F
    high = blocks >> 4
    codes = jnp.stack([low, high], axis=-1)  # [..., G, 16, 2]
    return codes.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK_SIZE)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """Inverse of :func:`unpack_nibbles`: codes ``[..., K]`` to blocks ``[..., K/32, 16]``."""
    if codes.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"the last axis ({codes.shape[-1]}) must be a multiple of {BLOCK_SIZE}")
    pairs = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], -1, BYTES_PER_BLOCK, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def e2m1_e8m0_to_float32(codes: jax.Array, scales: jax.Array) -> jax.Array:
    """Exact ``E2M1_VALUES[codes] * 2**(scales - 127)`` as float32, built bit by bit.

    Args:
      codes: uint8 E2M1 codes (low 4 bits used).
      scales: uint8 E8M0 scales, broadcastable against ``codes``.

    Returns:
      float32 values; NaN where the scale is 255.
    """
    codes = codes.astype(jnp.int32)
    scale = scales.astype(jnp.int32)
    sign = (codes >> 3) & 1
    exponent_bits = (codes >> 1) & 3
    mantissa_bit = codes & 1
    is_zero = (codes & 7) == 0
    # 0.5 (exponent 0, mantissa 1) is 2**-1 with an empty mantissa; every other nonzero code is
    # 2**(e-1) * (1 + m/2). Either way the biased float32 exponent of value * 2**(s-127) is:
    biased = jnp.where(exponent_bits == 0, scale - 1, scale + exponent_bits - 1)
    mantissa = jnp.where(exponent_bits == 0, 0, mantissa_bit)
    normal_bits = (biased << 23) | (mantissa << 22)
    # biased is 0 or -1 below the normal range: the value is (2 + m) * 2**(biased + 21) ulps.
    subnormal_bits = (2 + mantissa) << jnp.maximum(biased + 21, 0)
    magnitude = jnp.where(biased >= 1, normal_bits, subnormal_bits)
    magnitude = jnp.where(biased >= 255, _FLOAT32_INF_BITS, magnitude)  # 6 * 2**127 overflows
    magnitude = jnp.where(is_zero, 0, magnitude)
    bits = (sign << 31) | magnitude
    values = jax.lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)
    return jnp.where(scale == _SCALE_NAN, jnp.float32(jnp.nan), values)


def dequantize(blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """Decode MXFP4 weights.

    Args:
      blocks: uint8 ``[..., N, G, 16]``.
      scales: uint8 ``[..., N, G]``.
      dtype: ``bfloat16`` or ``float32``; every finite MXFP4 value is exact in both.

    Returns:
      ``[..., N, G * 32]`` in ``dtype``.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(
            f"blocks {blocks.shape} and scales {scales.shape} do not match: expected blocks "
            f"[..., G, {BYTES_PER_BLOCK}] and scales [..., G]"
        )
    codes = unpack_nibbles(blocks).reshape(*scales.shape, BLOCK_SIZE)
    values = e2m1_e8m0_to_float32(codes, scales[..., None])
    values = values.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK_SIZE)
    if jnp.dtype(dtype) == jnp.bfloat16:
        # Every MXFP4 value has at most two significant bits, so the upper half of its float32
        # bits is exactly its bfloat16 (subnormals too, which a converting cast may flush).
        bits = jax.lax.bitcast_convert_type(values, jnp.uint32) >> 16
        return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)
    return values.astype(dtype)


def _round_to_e2m1(magnitude: jax.Array) -> jax.Array:
    """Round non-negative values to the nearest E2M1 code (ties to even), saturating at 6."""
    # Midpoint i lies between codes i and i+1. A value exactly on it goes to the even code:
    # down when i is even, up when i is odd.
    midpoints = (E2M1_VALUES[:7] + E2M1_VALUES[1:8]) / 2
    code = jnp.zeros(magnitude.shape, jnp.int32)
    for i, midpoint in enumerate(midpoints):
        above = magnitude >= midpoint if i % 2 else magnitude > midpoint
        code += above.astype(jnp.int32)
    return code


def _float32_bits(weights: jax.Array) -> jax.Array:
    """The float32 bits (uint32) of each weight, widened without float arithmetic.

    bfloat16 is the upper half of a float32, so it widens by a shift: a float conversion could
    flush subnormal inputs to zero on the CPU.
    """
    if weights.dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(weights, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(weights.astype(jnp.float32), jnp.uint32)


def _power_of_two(exponent: jax.Array) -> jax.Array:
    """float32 ``2**exponent`` built from its bits; 0 below the normal range (see :func:`quantize`)."""
    bits = (jnp.clip(exponent, -126, 127) + 127).astype(jnp.uint32) << 23
    return jnp.where(exponent >= -126, jax.lax.bitcast_convert_type(bits, jnp.float32), 0.0)


def quantize(weights: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encode weights to MXFP4 with the OCP Microscaling (MX v1.0) rule.

    Each block of 32 along ``axis`` (the contraction axis K) gets the scale
    ``2**(floor(log2(amax)) - 2)`` (2 is the exponent of E2M1's largest value), clamped to the
    E8M0 range; values divided by it round to the nearest E2M1 value, ties to even, saturating
    at +-6. An all-zero block gets the smallest scale, byte 0.

    Everything up to the rounding is integer arithmetic on the float32 bits, so subnormal
    weights (which XLA on the CPU would flush to zero in float arithmetic) quantize exactly:
    each weight is ``M * 2**E`` with an integer significand M < 2**24, and its scaled value
    ``M * 2**(E - shared)`` is a product of two normal floats. Where that power of two is below
    the normal range the product is below 2**-102, which rounds to zero all the same.

    Args:
      weights: float ``[..., N, K]`` (K on ``axis``, a multiple of 32; with ``axis`` elsewhere,
        such as ``[E, K, N]`` with ``axis=1``, the blocks are formed there and the outputs are
        laid out with K last all the same, which costs less than transposing the input).
      axis: the axis K.

    Returns:
      ``(blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32], finite bool [..., N, K/32])``:
      ``finite`` is False for a block holding a NaN or an infinity, whose codes mean nothing.
    """
    axis = axis % weights.ndim
    if weights.shape[axis] % BLOCK_SIZE:
        raise ValueError(f"axis {axis} ({weights.shape[axis]}) must be a multiple of {BLOCK_SIZE}")
    bits = _float32_bits(weights)
    bits = bits.reshape(*weights.shape[:axis], -1, BLOCK_SIZE, *weights.shape[axis + 1:])  # [..., G, 32, rest]
    element_axis = axis + 1
    negative = (bits >> 31).astype(jnp.int32)
    magnitude = (bits & 0x7FFFFFFF).astype(jnp.int32)  # ordered as the absolute values are
    exponent_field, mantissa_field = magnitude >> 23, magnitude & 0x7FFFFF
    amax = jnp.max(magnitude, axis=element_axis, keepdims=True)
    amax_exponent, amax_mantissa = amax >> 23, amax & 0x7FFFFF
    floor_log2_amax = jnp.where(amax_exponent > 0, amax_exponent - 127,
                                31 - jax.lax.clz(amax_mantissa) - 149)  # a subnormal amax
    shared_exponent = jnp.where(amax > 0, floor_log2_amax - _E2M1_EMAX, _SCALE_DTYPE_MIN_EXPONENT)
    shared_exponent = jnp.clip(shared_exponent, _SCALE_DTYPE_MIN_EXPONENT, _SCALE_DTYPE_MAX_EXPONENT)
    significand = jnp.where(exponent_field > 0, mantissa_field | 0x800000, mantissa_field)
    exponent = jnp.where(exponent_field > 0, exponent_field - 150, -149)
    scaled = significand.astype(jnp.float32) * _power_of_two(exponent - shared_exponent)
    codes = (_round_to_e2m1(scaled) | (negative << 3)).astype(jnp.uint8)
    # Element 2j in the low nibble of byte j, 2j+1 in the high one.
    pairs = codes.reshape(*codes.shape[:element_axis], BYTES_PER_BLOCK, 2, *codes.shape[element_axis + 1:])
    low = jax.lax.index_in_dim(pairs, 0, element_axis + 1, keepdims=False)
    high = jax.lax.index_in_dim(pairs, 1, element_axis + 1, keepdims=False)
    blocks = jnp.moveaxis(low | (high << 4), (axis, element_axis), (-2, -1))
    scales = jnp.moveaxis(jnp.squeeze(shared_exponent + SCALE_BIAS, element_axis).astype(jnp.uint8), axis, -1)
    finite = jnp.moveaxis(jnp.squeeze(amax < _FLOAT32_INF_BITS, element_axis), axis, -1)
    return blocks, scales, finite
