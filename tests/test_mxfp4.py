"""The MXFP4 format, bit for bit against ml_dtypes' float4_e2m1fn and float8_e8m0fnu."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import mxfp4

ALL_CODES = np.arange(16, dtype=np.uint8)
ALL_SCALES = np.arange(256, dtype=np.uint8)


def ml_dtypes_e2m1(codes: np.ndarray) -> np.ndarray:
    """float64 values of E2M1 codes through ml_dtypes (codes are the low nibble of the byte)."""
    return codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64)


def ml_dtypes_e8m0(scales: np.ndarray) -> np.ndarray:
    return scales.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)


def test_value_table_matches_ml_dtypes_including_negative_zero():
    expected = ml_dtypes_e2m1(ALL_CODES).astype(np.float32)
    np.testing.assert_array_equal(mxfp4.E2M1_VALUES.view(np.uint32), expected.view(np.uint32))
    assert np.signbit(mxfp4.E2M1_VALUES[8]) and mxfp4.E2M1_VALUES[8] == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_code_times_every_scale_is_bit_exact(dtype):
    codes, scales = np.meshgrid(ALL_CODES, ALL_SCALES, indexing="ij")
    with np.errstate(over="ignore"):
        expected = (ml_dtypes_e2m1(codes) * ml_dtypes_e8m0(scales)).astype(dtype)
    # One block per (code, scale): the code repeated 32 times, so dequantize runs end to end.
    blocks = np.repeat((codes | (codes << 4)).reshape(-1, 1, 1), mxfp4.BYTES_PER_BLOCK, axis=-1)
    got = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales.reshape(-1, 1)), dtype))
    assert got.shape == (16 * 256, 32)
    bits = np.uint32 if dtype == jnp.float32 else np.uint16
    finite = np.isfinite(expected.reshape(-1).astype(np.float32))
    np.testing.assert_array_equal(
        got[finite, 0].view(bits), expected.reshape(-1)[finite].view(bits)
    )
    assert np.all(np.isnan(got[scales.reshape(-1) == 255].astype(np.float32)))
    # The extremes: the smallest scale gives subnormals, 6 * 2**127 overflows to infinity.
    smallest = got.reshape(16, 256, 32)[1, 0, 0].astype(np.float64)
    assert smallest == 0.5 * 2.0**-127
    assert np.isinf(got.reshape(16, 256, 32)[7, 254, 0].astype(np.float32))


def test_low_nibble_is_the_even_element():
    # 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1.
    blocks = np.full((1, 1, 16), 0x21, np.uint8)
    values = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.full((1, 1), 127, jnp.uint8), jnp.float32))
    np.testing.assert_array_equal(values[0, :4], [0.5, 1.0, 0.5, 1.0])


def test_scale_applies_per_block_of_32():
    blocks = np.full((1, 2, 16), 0x22, np.uint8)
    scales = np.array([[127 + 3, 127 - 2]], np.uint8)
    values = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32))
    np.testing.assert_array_equal(values[0, :32], 8.0)
    np.testing.assert_array_equal(values[0, 32:], 0.25)


def ocp_quantize_reference(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The OCP MX rule with ml_dtypes' casts: scale 2**(floor(log2 amax) - 2), RNE, saturate."""
    blocks = weights.reshape(*weights.shape[:-1], -1, 32).astype(np.float64)
    amax = np.abs(blocks).max(-1)
    with np.errstate(divide="ignore"):
        exponent = np.where(amax > 0, np.floor(np.log2(amax)) - 2, -127)
    exponent = np.clip(exponent, -127, 127)
    codes = (blocks / np.exp2(exponent)[..., None]).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    return codes.reshape(weights.shape), (exponent + 127).astype(np.uint8)


def test_quantize_follows_the_ocp_rule():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((3, 8, 128)) * np.exp2(rng.integers(-30, 30, (3, 8, 1)))
    weights[0, 0, :32] = 0  # an all-zero block
    weights[1, 1, :32] = 6 * 2.0**-5  # exactly representable at the top of its range
    weights = weights.astype(np.float32)
    blocks, scales, _ = mxfp4.quantize(jnp.asarray(weights))
    codes, expected_scales = ocp_quantize_reference(weights)
    np.testing.assert_array_equal(np.asarray(scales), expected_scales)
    np.testing.assert_array_equal(np.asarray(mxfp4.unpack_nibbles(blocks)), codes)


def test_rounding_ties_go_to_even_and_large_values_saturate():
    # With scale 2**0 (amax in [4, 8)): midpoints 0.25 0.75 1.25 1.75 2.5 3.5 5 and beyond 6.
    row = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.5, -0.25, -5.0] + [0.0] * 22, np.float32)
    blocks, scales, _ = mxfp4.quantize(jnp.asarray(row[None]))
    assert int(scales[0, 0]) == 127
    decoded = np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32))[0, :10]
    np.testing.assert_array_equal(decoded, [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -4.0])


def test_representable_weights_round_trip_exactly():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (4, 64)).astype(np.uint8)
    codes[:, 0] = 7  # each block's amax is 6 * scale, so the encoder picks that scale back
    codes[:, 32] = 15
    scales = rng.integers(100, 150, (4, 2)).astype(np.uint8)
    blocks = mxfp4.pack_nibbles(jnp.asarray(codes))
    weights = mxfp4.dequantize(blocks, jnp.asarray(scales), jnp.float32)
    again_blocks, again_scales, _ = mxfp4.quantize(weights)
    np.testing.assert_array_equal(np.asarray(again_scales), scales)
    np.testing.assert_array_equal(
        np.asarray(mxfp4.dequantize(again_blocks, again_scales, jnp.float32)), np.asarray(weights)
    )


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(jnp.zeros((2, 3, 16), jnp.uint8), jnp.zeros((2, 4), jnp.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(jnp.zeros((2, 33)))
