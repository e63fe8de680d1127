"""An independent model of the OCP Microscaling (MX v1.0) rule for MXFP4, in float64 NumPy, that
the tests hold the quantizer to (imported by test_quantization.py and test_dense_checkpoints.py)."""

from __future__ import annotations

import numpy as np

E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def reference_quantize(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The OCP MX v1.0 rule in float64 NumPy: codes ``[..., K]`` and E8M0 scale bytes ``[..., K/32]``.

    Scale ``2**(floor(log2 amax) - emax)`` with emax = 2 for E2M1, clamped to E8M0's
    ``[-127, 127]``; an all-zero block takes the smallest. Each element goes to the nearest
    E2M1 magnitude, a tie to the one with an even mantissa (an even index), beyond 6 to 6.
    """
    blocks = weights.astype(np.float64).reshape(*weights.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(axis=-1)
    _, exponent = np.frexp(amax)  # amax = m * 2**exponent, m in [0.5, 1): floor(log2 amax) = exponent - 1
    shared = np.clip(np.where(amax > 0, exponent - 1 - 2, -127), -127, 127)
    scaled = np.abs(blocks) / np.exp2(shared)[..., None]
    distance = np.abs(scaled[..., None] - E2M1_MAGNITUDES)
    nearest = distance == distance.min(axis=-1, keepdims=True)
    even_nearest = nearest & (np.arange(8) % 2 == 0)
    index = np.where(even_nearest.any(axis=-1), even_nearest.argmax(axis=-1), nearest.argmax(axis=-1))
    codes = index | (np.signbit(blocks).astype(np.int64) << 3)
    return codes.reshape(weights.shape).astype(np.uint8), (shared + 127).astype(np.uint8)


def reference_dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 values of codes ``[..., K]`` under E8M0 scale bytes ``[..., K/32]``."""
    values = np.where(codes >= 8, -1.0, 1.0) * E2M1_MAGNITUDES[codes & 7]
    return values * np.exp2(scales.astype(np.float64) - 127).repeat(32, axis=-1)
