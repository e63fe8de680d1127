"""The MXFP4 quantizer against an independent NumPy model of the OCP Microscaling v1.0 rule, and
its streaming form for dense expert tensors against transformers' own MXFP4 decoder."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from gptoss_jax.checkpoints.dense_experts import dense_from_mxfp4, experts_per_chunk, quantize_dense_experts
from gptoss_jax.checkpoints.folder import CheckpointError
from mx_reference import E2M1_MAGNITUDES, reference_dequantize, reference_quantize
from pallas_kernels import mxfp4

def quantized_codes(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blocks, scales, _ = mxfp4.quantize(jnp.asarray(weights))
    return np.asarray(mxfp4.unpack_nibbles(blocks)), np.asarray(scales)


def test_the_reference_model_reads_the_e2m1_table_as_ml_dtypes_does():
    codes = np.arange(16, dtype=np.uint8)
    values = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    np.testing.assert_array_equal(np.where(codes >= 8, -1, 1) * E2M1_MAGNITUDES[codes & 7], values)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_every_code_under_every_scale_round_trips_exactly(dtype):
    # One block per (code, scale): the code at even elements, a 6 at odd ones so that the
    # block's amax (6 * scale) picks its scale back. Scale bytes 253 and 254 are left out: 6 times
    # them overflows every float format, so no finite weight quantizes to them.
    codes, scale_bytes = np.meshgrid(np.arange(16, dtype=np.uint8), np.arange(253, dtype=np.uint8), indexing="ij")
    block_codes = np.stack([codes.reshape(-1, 1).repeat(16, 1), np.full((codes.size, 16), 7, np.uint8)], -1)
    blocks = mxfp4.pack_nibbles(jnp.asarray(block_codes.reshape(-1, 32)))[:, None]
    scales = jnp.asarray(scale_bytes.reshape(-1, 1, 1))
    weights = mxfp4.dequantize(blocks, scales, dtype)  # [16 * 253, 1, 32], subnormal at the smallest scales

    again_blocks, again_scales, _ = mxfp4.quantize(weights)

    np.testing.assert_array_equal(np.asarray(again_scales), np.asarray(scales))
    np.testing.assert_array_equal(np.asarray(again_blocks), np.asarray(blocks))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32, np.float16])
def test_random_weights_at_every_magnitude_match_the_reference(dtype):
    rng = np.random.default_rng(0)
    low, high = (-24, 13) if dtype == np.float16 else (-150, 125)
    weights = rng.standard_normal((6, 64, 128)) * np.exp2(rng.integers(low, high, (6, 64, 1)))
    weights[0, 0, :32] = 0  # all zero
    weights[0, 1, :32] = -0.0  # all negative zero: code 8, the smallest scale
    weights = weights.astype(dtype)

    codes, scales = quantized_codes(weights)

    expected_codes, expected_scales = reference_quantize(weights)
    np.testing.assert_array_equal(scales, expected_scales)
    np.testing.assert_array_equal(codes, expected_codes)
    assert scales[0, 0, 0] == scales[0, 1, 0] == 0
    assert (codes[0, 0, :32] == 0).all() and (codes[0, 1, :32] == 8).all()


def test_ties_go_to_the_even_code():
    # Scale 2**0 (amax 6): each midpoint between neighbouring E2M1 values, both signs.
    midpoints = (E2M1_MAGNITUDES[:-1] + E2M1_MAGNITUDES[1:]) / 2  # 0.25 0.75 1.25 1.75 2.5 3.5 5
    row = np.zeros(32, np.float32)
    row[0] = 6.0
    row[1:8], row[8:15] = midpoints, -midpoints
    codes, scales = quantized_codes(row[None])
    assert scales[0, 0] == 127
    # To 0, 1, 1, 2, 2, 4, 4: the neighbour with an even mantissa.
    np.testing.assert_array_equal(codes[0, 1:8], [0, 2, 2, 4, 4, 6, 6])
    np.testing.assert_array_equal(codes[0, 8:15], [8, 10, 10, 12, 12, 14, 14])
    np.testing.assert_array_equal(codes, reference_quantize(row[None])[0])


def test_values_beyond_six_times_the_scale_saturate():
    # amax 7.75 sets scale 2**0 (floor(log2 7.75) = 2), so 6.5 ... 7.75 all saturate to 6.
    row = np.zeros(32, np.float32)
    row[:4] = [7.75, 7.0, -6.5, 6.25]
    codes, scales = quantized_codes(row[None])
    assert scales[0, 0] == 127
    np.testing.assert_array_equal(codes[0, :4], [7, 7, 15, 7])


def test_the_largest_and_smallest_scales():
    largest = np.zeros(32, np.float32)
    largest[0] = np.finfo(np.float32).max  # floor(log2) = 127: scale 2**125, byte 252
    smallest = np.zeros(32, np.float32)
    smallest[:3] = [2.0**-127, 2.0**-129, 2.0**-149]  # subnormal: scale clamped to 2**-127, byte 0
    codes, scales = quantized_codes(np.stack([largest, smallest]))
    np.testing.assert_array_equal(scales[:, 0], [252, 0])
    assert codes[0, 0] == 7  # 2**128 * (1 - 2**-24) / 2**125 is just under 8: saturates to 6
    np.testing.assert_array_equal(codes[1, :3], [2, 0, 0])  # 1.0, 0.25 (a tie, to 0), 2**-22
    expected_codes, expected_scales = reference_quantize(np.stack([largest, smallest]))
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_array_equal(scales, expected_scales)


# The streaming quantizer of dense expert tensors [E, K, N], as transformers saves them.


def transformers_dense(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' own MXFP4 decoder (what Mxfp4Config(dequantize=True) runs), float32 ``[E, K, N]``."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32).numpy()


def test_dense_experts_quantize_in_transformers_layout():
    rng = np.random.default_rng(1)
    dense = (rng.standard_normal((4, 64, 96)) * 0.02).astype(ml_dtypes.bfloat16)  # [E, K, N], off the grid

    blocks, scales = quantize_dense_experts(lambda experts: dense[experts], dense.shape, dense.dtype, "t")

    assert blocks.shape == (4, 96, 2, 16) and scales.shape == (4, 96, 2)  # [E, N, K/32, 16]
    codes, expected_scales = reference_quantize(np.swapaxes(dense, 1, 2))
    np.testing.assert_array_equal(scales, expected_scales)
    np.testing.assert_array_equal(np.asarray(mxfp4.unpack_nibbles(jnp.asarray(blocks))), codes)
    # transformers decodes them back to the reference rule's values, in the dense layout.
    grid_values = reference_dequantize(codes, expected_scales)
    np.testing.assert_array_equal(transformers_dense(blocks, scales), np.swapaxes(grid_values, 1, 2))


def test_a_dense_save_of_mxfp4_experts_quantizes_back_to_the_same_bytes():
    rng = np.random.default_rng(2)
    original_blocks, original_scales, _ = mxfp4.quantize(jnp.asarray(rng.standard_normal((8, 64, 128)), jnp.float32))
    original_blocks, original_scales = np.asarray(original_blocks), np.asarray(original_scales)
    dense = dense_from_mxfp4(original_blocks, original_scales, ml_dtypes.bfloat16)
    np.testing.assert_array_equal(dense.astype(np.float32), transformers_dense(original_blocks, original_scales))

    blocks, scales = quantize_dense_experts(lambda experts: dense[experts], dense.shape, dense.dtype, "t")

    np.testing.assert_array_equal(blocks, original_blocks)
    np.testing.assert_array_equal(scales, original_scales)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_is_an_error_naming_the_tensor_and_expert(bad, monkeypatch):
    monkeypatch.setattr("gptoss_jax.checkpoints.dense_experts.CHUNK_BYTES", 2 * 64 * 96 * 4)  # 2 experts a step
    dense = np.zeros((6, 64, 96), np.float32)
    dense[3, 10, 5] = bad
    with pytest.raises(CheckpointError) as error_info:
        quantize_dense_experts(lambda experts: dense[experts], dense.shape, dense.dtype, "f.safetensors: tensor 'x'")
    assert str(error_info.value) == ("f.safetensors: tensor 'x': expert 3 holds NaN or infinite weights, "
                                     "which MXFP4 cannot encode")


def test_chunks_divide_the_experts_within_the_budget(monkeypatch):
    monkeypatch.setattr("gptoss_jax.checkpoints.dense_experts.CHUNK_BYTES", 64 * 2**20)
    assert experts_per_chunk((128, 2880, 5760), 2) == 2  # gpt-oss-120b's mlp1: 31.6 MiB an expert
    assert experts_per_chunk((32, 2880, 2880), 2) == 4  # gpt-oss-20b's mlp2: 15.8 MiB an expert
    assert experts_per_chunk((6, 64, 96), 4) == 6
    assert experts_per_chunk((7, 2048, 2048), 4) == 1  # 16 MiB: 4 fit, but only 1 and 7 divide 7
