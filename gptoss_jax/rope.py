"""YaRN rotary position embedding as gpt-oss uses it.

Frequencies between YaRN's low and high correction dimensions blend the original and the
interpolated (divided by ``scaling_factor``) frequencies. The range stays fractional (spec
pitfall P1), and the concentration ``0.1 ln(s) + 1`` multiplies cos and sin, so it scales both
q and k. Rotation pairs dimension i with i + head_dim/2 ("rotate half"), not adjacent pairs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def yarn_correction_range(
    head_dim: int, base: float, initial_context_length: int, ntk_alpha: float, ntk_beta: float
) -> tuple[float, float]:
    """YaRN's (low, high) dimensions; ``ntk_beta`` (beta_fast) sets low, ``ntk_alpha`` high."""

    def dimension(rotations: float) -> float:
        return head_dim * math.log(initial_context_length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    return dimension(ntk_beta), dimension(ntk_alpha)


def yarn_inverse_frequencies(
    head_dim: int, base: float, scaling_factor: float, initial_context_length: int,
    ntk_alpha: float, ntk_beta: float,
) -> tuple[np.ndarray, float]:
    """``(inverse frequencies float32 [head_dim/2], concentration)``, computed in float32 like the reference."""
    freq = np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    low, high = yarn_correction_range(head_dim, base, initial_context_length, ntk_alpha, ntk_beta)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep_original = np.float32(1) - ramp
    interpolation = np.float32(1) / (np.float32(scaling_factor) * freq)
    extrapolation = np.float32(1) / freq
    inverse_frequencies = interpolation * (1 - keep_original) + extrapolation * keep_original
    concentration = 0.1 * math.log(scaling_factor) + 1.0
    return inverse_frequencies.astype(np.float32), concentration


def rotary_cos_sin(
    positions: jax.Array, inverse_frequencies: np.ndarray, concentration: float, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[..., head_dim/2]`` for int ``positions [...]``, scaled and cast to ``dtype``.

    The angles are a float32 broadcast product: a low-precision matmul here would round
    positions (bfloat16 turns 257 into 256).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies)
    return (
        (jnp.cos(angles) * concentration).astype(dtype),
        (jnp.sin(angles) * concentration).astype(dtype),
    )


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [..., T, heads, head_dim]`` by ``cos, sin [..., T, head_dim/2]`` (rotate-half)."""
    first, second = jnp.split(x, 2, axis=-1)
    cos = cos[..., None, :]
    sin = sin[..., None, :]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
