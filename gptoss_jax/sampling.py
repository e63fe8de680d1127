"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Log-probabilities are those of the untempered distribution, as OpenAI's reference reports them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens (Hugging Face's names).

    A pytree whose leaves are ``temperature`` and ``top_p``, so a compiled decode loop takes new
    values of them without recompiling; whether decoding is greedy, ``top_k`` and whether top-p
    filtering happens at all shape the program and are static.

    Attributes:
      temperature: 0 picks the most likely token (greedy); otherwise logits are divided by it.
      top_k: keep only the k most likely tokens (None: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches p (None or 1: all).
      greedy: (derived) temperature is 0.
      filters_top_p: (derived) top_p keeps less than everything.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        # Decided here, from concrete values: under tracing temperature and top_p are tracers.
        object.__setattr__(self, "greedy", self.temperature == 0)
        object.__setattr__(self, "filters_top_p", self.top_p is not None and self.top_p < 1)

    def tree_flatten(self):
        leaves = (self.temperature, self.top_p if self.filters_top_p else None)
        return leaves, (self.top_k, self.greedy, self.filters_top_p)

    @classmethod
    def tree_unflatten(cls, static, leaves) -> SamplingConfig:
        # The leaves may be tracers: set the attributes without validating them again.
        config = object.__new__(cls)
        (temperature, top_p), (top_k, greedy, filters_top_p) = leaves, static
        for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                            ("greedy", greedy), ("filters_top_p", filters_top_p)):
            object.__setattr__(config, name, value)
        return config


def _top_p_mask(sorted_logits: jax.Array, top_p: float) -> jax.Array:
    """Keep mask over logits sorted in descending order: the prefix whose mass reaches top_p."""
    probabilities = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probabilities, axis=-1) - probabilities
    return mass_before < top_p  # the most likely token always stays


def sample(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """Pick one token per row of float32 ``logits [B, V]``; returns int32 ``[B]``."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    if config.top_k is None and not config.filters_top_p:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    if config.top_k is not None:
        candidate_logits, candidates = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))
    else:
        candidates = jnp.argsort(-logits, axis=-1)
        candidate_logits = jnp.take_along_axis(logits, candidates, axis=-1)
    if config.filters_top_p:
        candidate_logits = jnp.where(_top_p_mask(candidate_logits, config.top_p), candidate_logits, -jnp.inf)
    choice = jax.random.categorical(key, candidate_logits, axis=-1)
    return jnp.take_along_axis(candidates, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(token) under the untempered ``logits [B, V]`` for ``tokens [B]``; float32 ``[B]``."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Per-row sampling settings, as arrays, for a batch whose rows are different requests.

    Every leaf is traced, so new values never recompile. Two choices are static, since they
    spare work: whether any row samples at all (drawing noise for every row), and whether any row
    keeps fewer than all tokens (sorting the vocabulary). Neither changes a row's token.

    Attributes:
      temperature: float32 ``[B]``; 0 is greedy.
      top_k: int32 ``[B]``; 0 keeps every token.
      top_p: float32 ``[B]``; 1 keeps every token.
      keys: PRNG keys ``[B]``, each row's own stream (folded with the row's token index).
      samples: (static) some row has a temperature above 0.
      filters: (static) some sampling row has a top-k or a top-p below 1.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array
    samples: bool
    filters: bool

    def tree_flatten(self):
        return (self.temperature, self.top_k, self.top_p, self.keys), (self.samples, self.filters)

    @classmethod
    def tree_unflatten(cls, static, leaves) -> RowSampling:
        return cls(*leaves, *static)


def _kept_tokens(scaled_logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """bool ``[B, V]``: the tokens each row's top-k, then top-p (over those k, renormalized), keep.

    A row whose top_k is 0 and top_p 1 keeps every token, exactly (no rounding of the cumulative
    sum can drop its tail), so its draw is the one it gets when no row filters.
    """
    vocab = scaled_logits.shape[-1]
    sorted_logits = -jnp.sort(-scaled_logits, axis=-1)
    rank = jnp.arange(vocab)[None]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    in_top_k = rank < k
    probabilities = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probabilities, axis=-1) - probabilities
    kept_sorted = in_top_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1))
    # The kept tokens are a prefix of the sorted order; keep every token at least as likely as its last.
    threshold = jnp.take_along_axis(sorted_logits, jnp.sum(kept_sorted, axis=-1, keepdims=True) - 1, axis=-1)
    return scaled_logits >= threshold


def sample_rows(logits: jax.Array, step: jax.Array, sampling: RowSampling) -> jax.Array:
    """Pick one token per row of float32 ``logits [B, V]``, each row by its own settings; int32 ``[B]``.

    Row r draws with ``fold_in(keys[r], step[r])`` (``step``: int32 ``[B]``, the row's token
    index), by Gumbel-max in vocabulary order, so its token depends on its logits, settings, key
    and step only: never on the other rows, nor on whether they made the program filter.
    """
    if not sampling.samples:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    greedy = sampling.temperature == 0
    scaled = logits / jnp.where(greedy, 1.0, sampling.temperature)[:, None]
    if sampling.filters:
        scaled = jnp.where(_kept_tokens(scaled, sampling.top_k, sampling.top_p), scaled, -jnp.inf)
    keys = jax.vmap(jax.random.fold_in)(sampling.keys, step)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], jnp.float32))(keys)
    sampled = jnp.argmax(scaled + noise, axis=-1)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)


def top_logprobs(logits: jax.Array, tokens: jax.Array, count: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The chosen tokens' log-probabilities and the ``count`` most likely alternatives.

    Args:
      logits: float32 ``[B, V]`` (untempered).
      tokens: int32 ``[B]``.
      count: (static) alternatives per row.

    Returns:
      (float32 ``[B]``, int32 ``[B, count]`` token ids, float32 ``[B, count]`` their log-probabilities).
    """
    log_probabilities = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_probabilities, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(log_probabilities, count)
    return chosen, top_ids.astype(jnp.int32), top_values
