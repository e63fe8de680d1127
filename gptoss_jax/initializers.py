"""Random initial values of the model's weights, drawn in pieces of bounded size.

Drawn whole, a weight's random bits and float32 values take several times its size in
temporaries (16 bytes an element for a bfloat16 normal: 9.3 GB for gpt-oss's 1.16 GB embedding);
drawn in pieces of at most :data:`MAX_PIECE_ELEMENTS`, one piece's worth. The pieces are equal
runs of rows (along axis 0), each from its own key folded from the weight's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

STDDEV = 0.02
MAX_PIECE_ELEMENTS = 1 << 22

Draw = Callable[[jax.Array, tuple[int, ...]], jax.Array]  # (key, shape) -> array


def drawn_in_pieces(key: jax.Array, shape: tuple[int, ...], draw: Draw) -> jax.Array:
    """``draw(key_i, piece_shape)`` over pieces of ``shape``'s rows, joined into ``shape``."""
    rows, row_elements = shape[0], math.prod(shape[1:])
    rows_per_piece = max(
        (d for d in range(1, rows + 1) if rows % d == 0 and d * row_elements <= MAX_PIECE_ELEMENTS), default=1
    )
    if rows_per_piece == rows:
        return draw(key, shape)
    pieces = jax.lax.map(lambda piece: draw(jax.random.fold_in(key, piece), (rows_per_piece, *shape[1:])),
                         jnp.arange(rows // rows_per_piece))
    return pieces.reshape(shape)


def normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """Normal values of standard deviation :data:`STDDEV`, drawn in float32 and rounded to ``dtype``."""

    def draw(key: jax.Array, piece_shape: tuple[int, ...]) -> jax.Array:
        return (STDDEV * jax.random.normal(key, piece_shape)).astype(dtype)

    return drawn_in_pieces(key, shape, draw)


def random_bytes(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform uint8 values (random MXFP4 blocks: every code in both nibbles)."""
    return drawn_in_pieces(key, shape, functools.partial(jax.random.bits, dtype=jnp.uint8))
