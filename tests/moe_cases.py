"""Random MXFP4 grouped-matmul problems for the expert kernels' tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

HIDDEN = 2880  # gpt-oss-20b and 120b: hidden size = expert intermediate size


def mxfp4_problem(rows, k, n, group_sizes, *, scale_range=(122, 132), seed=0):
    """A grouped matmul's operands (``lhs [rows, k]``, ``group_sizes``, random MXFP4 ``blocks`` and
    ``scales`` of ``[experts, n, k]`` weights, ``bias``) as keyword arguments, and ``[rows]`` routing weights."""
    rng = np.random.default_rng(seed)
    experts = len(group_sizes)
    blocks = rng.integers(0, 256, (experts, n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(*scale_range, (experts, n, k // 32), dtype=np.uint8)
    bias = rng.standard_normal((experts, n)).astype(np.float32)
    lhs = rng.standard_normal((rows, k)).astype(np.float32)
    row_weights = rng.random(rows).astype(np.float32)
    return dict(
        lhs=jnp.asarray(lhs, jnp.bfloat16),
        group_sizes=jnp.asarray(group_sizes, jnp.int32),
        blocks=jnp.asarray(blocks),
        scales=jnp.asarray(scales),
        bias=jnp.asarray(bias, jnp.bfloat16),
    ), jnp.asarray(row_weights)
