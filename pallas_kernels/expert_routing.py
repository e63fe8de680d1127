"""Routing glue for grouped expert matmuls: sort token-expert pairs by expert, and back.

Every token picks ``k`` experts. The grouped matmuls run over the ``tokens * k`` assignments
sorted by expert, so each expert's rows are contiguous and its weights are read once.
Plain XLA (argsort, gather, segment sums); no ``jax.lax.ragged_dot``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertGroups(NamedTuple):
    """Token-expert assignments sorted by expert.

    Attributes:
      token_index: int32 ``[tokens * k]``, the token each sorted row comes from.
      assignment_order: int32 ``[tokens * k]``, the flat ``token * k + slot`` index of each sorted
        row, so ``rows[inverse]`` puts sorted rows back in assignment order.
      group_sizes: int32 ``[experts]``, the number of rows of each expert.
    """

    token_index: jax.Array
    assignment_order: jax.Array
    group_sizes: jax.Array


def group_by_expert(expert_indices: jax.Array, num_experts: int) -> ExpertGroups:
    """Sort the assignments ``expert_indices`` (int ``[tokens, k]``) by expert, stably."""
    tokens, k = expert_indices.shape
    flat_experts = expert_indices.reshape(-1).astype(jnp.int32)
    assignment_order = jnp.argsort(flat_experts, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    return ExpertGroups(assignment_order // k, assignment_order, group_sizes)


def expert_of_rows(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """The expert of each sorted row: int32 ``[num_rows]`` (rows past the groups get ``experts``)."""
    group_ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(group_ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


def combine_experts(
    sorted_outputs: jax.Array, groups: ExpertGroups, k: int, dtype: jnp.dtype
) -> jax.Array:
    """Sum each token's ``k`` weighted expert outputs.

    Args:
      sorted_outputs: ``[tokens * k, hidden]`` in expert order, already multiplied by the
        routing weights (float32, so the sum rounds once, like the reference's einsum).
      groups: the grouping that sorted them.
      k: experts per token.
      dtype: the output dtype.

    Returns:
      ``[tokens, hidden]`` in ``dtype``.
    """
    rows, hidden = sorted_outputs.shape
    in_assignment_order = jnp.zeros_like(sorted_outputs).at[groups.assignment_order].set(sorted_outputs)
    return in_assignment_order.reshape(rows // k, k, hidden).sum(axis=1).astype(dtype)
