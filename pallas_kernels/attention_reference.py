"""Plain-XLA reference of gpt-oss attention: GQA, learned sinks, causal and sliding-window masks.

The path the model takes where the Pallas attention kernels do not run, and their oracle.
Keys are addressed by absolute position, so one function covers a prompt attending to itself,
a chunk of a prompt attending to a KV cache, and decode against a ring buffer:

* a key is visible to a query when ``0 <= kv_position <= q_position`` and, on sliding-window
  layers, ``kv_position > q_position - window`` (the window counts the query's own token);
* each query head has a sink logit that joins the softmax denominator only (a key with score
  ``sink`` and a zero value), so a row's weights sum to less than one and never to 0/0.

Rounding follows OpenAI's torch reference: the scores round to the input dtype before the
softmax scale, the softmax runs in float32 and its probabilities round to the input dtype, and
the weighted value sum accumulates in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EMPTY_SLOT = -1
# How far a kernel's bfloat16 output may be from the exact attention (absolute and relative):
# bf16 output rounding (2^-8 relative near 1) plus bf16 probabilities in P @ V. The kernel tests
# and the first-use check (gptoss_jax.kernel_check) hold the kernels to it.
KERNEL_ATOL = 1.6e-2
"""kv_positions value of a cache slot that holds no key yet."""


def visible_keys(
    q_positions: jax.Array, kv_positions: jax.Array, sliding_window: int | None
) -> jax.Array:
    """bool ``[B, Tq, S]``: which keys each query may attend to."""
    q = q_positions[:, :, None]
    kv = kv_positions[:, None, :]
    visible = (kv >= 0) & (kv <= q)
    if sliding_window is not None:
        visible &= kv > q - sliding_window
    return visible


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sinks: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    sliding_window: int | None,
    softmax_scale: float,
) -> jax.Array:
    """Attention with sinks.

    Args:
      q: ``[B, Tq, Hq, D]``; query head h uses KV head ``h // (Hq // Hkv)``.
      k: ``[B, S, Hkv, D]``, after RoPE.
      v: ``[B, S, Hkv, D]``.
      sinks: ``[Hq]`` sink logits (not scaled).
      q_positions: int32 ``[B, Tq]`` absolute positions of the queries.
      kv_positions: int32 ``[B, S]`` absolute positions of the keys, :data:`EMPTY_SLOT` for none.
      sliding_window: keys per query on sliding-window layers (128 in gpt-oss), None for full.
      softmax_scale: multiplies q.k (1/sqrt(D)).

    Returns:
      ``[B, Tq, Hq, D]`` in q.dtype.
    """
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped_q = q.reshape(batch, q_len, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("btgmd,bsgd->bgmts", grouped_q, k, preferred_element_type=jnp.float32)
    scores = scores.astype(q.dtype).astype(jnp.float32) * softmax_scale
    visible = visible_keys(q_positions, kv_positions, sliding_window)[:, None, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    sink_logits = sinks.astype(jnp.float32).reshape(1, kv_heads, q_heads // kv_heads, 1, 1)
    row_max = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink_logits)
    exp_scores = jnp.exp(scores - row_max)
    denominator = jnp.sum(exp_scores, axis=-1, keepdims=True) + jnp.exp(sink_logits - row_max)
    probabilities = (exp_scores / denominator).astype(q.dtype)
    out = jnp.einsum("bgmts,bsgd->btgmd", probabilities, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)
