"""Jit-compiled generation: chunked prefill into a KV cache, then a decode loop on the device.

Prompts of different lengths share one batch: they are right-padded, and padding carries
position -1, so it is neither cached nor attended to. The prompt is prefilled in fixed-size
chunks (bounded activation memory for long prompts), then a ``lax.while_loop`` samples and
feeds back one token per step with no host round trip. With a ``streamer`` the same loop hands
each step's tokens to the host through an ordered ``io_callback``, without recompiling; the
streamer's answer can end the loop early (Ctrl-C in the CLI).

Shapes are bucketed (prompt chunk, cache length, output buffer: powers of two), so a new prompt
compiles only when it lands in a new bucket. The KV cache starts with room for at most
:data:`FIRST_CACHE_LENGTH` positions past the prompt; when a long generation fills it, the loop
returns, the cache doubles (the next bucket, compiled once) and the loop goes on, so memory and
the XLA path's attention (which reads every slot) follow the tokens generated, not
``max_new_tokens``.

The compiled programs live in a :class:`Generator` (one shared by default), and nothing of a call
lives outside it: several threads may generate at once, each streamer seeing its own tokens.

Example::

    import gptoss_jax
    model = gptoss_jax.load("gpt-oss-20b/")
    out = gptoss_jax.generate(model, [[200006, 17360, 200008]], max_new_tokens=64, temperature=0)
    out.tokens[0]                     # generated ids, the stop token included if one was hit
    out.stats.decode_tokens_per_second
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from gptoss_jax.compiled import CompiledByShape, donated
from gptoss_jax.errors import GptOssError
from gptoss_jax.kv_cache import KVCache
from gptoss_jax.model import GptOss
from gptoss_jax.sampling import SamplingConfig, sample, token_logprobs

Streamer = Callable[[np.ndarray, np.ndarray], bool | None]
"""Called once per decode step with (tokens int32 [B], active bool [B]): a row is inactive once
it has produced a stop token; its later tokens are not part of the output. Returning True stops
generation after this step: the tokens handed over so far, this step's included, are the output
(so stopping at the k-th call, counting from 0, leaves k + 1 tokens in each active row)."""

_MIN_BUCKET = 16
_MIN_CACHE = 256
FIRST_CACHE_LENGTH = 4096
"""Positions past the longest prompt the KV cache first has room for (it doubles when full)."""


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """Token counts and wall-clock seconds of one :func:`generate` call (compilation apart).

    With ``max_new_tokens=0`` nothing runs, not even the prefill: every figure is 0 and the
    rates are NaN.
    """

    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    compile_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else float("nan")


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What :func:`generate` returns.

    Attributes:
      tokens: per prompt, the generated token ids (a stop token, when hit, is the last one).
      logprobs: per prompt, the log-probability of each generated token under the untempered
        distribution, or None unless ``return_logprobs``.
      stats: throughput figures.
    """

    tokens: list[list[int]]
    logprobs: list[list[float]] | None
    stats: GenerationStats


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """The bucketed shapes of one :func:`generate` call."""

    chunk: int  # prompt tokens per row per prefill step
    padded_length: int  # the prompts' columns, a whole number of chunks
    cache_length: int  # the cache's positions at the start
    final_cache_length: int  # ... once it has grown for the whole generation
    buffer: int  # the output columns

    @classmethod
    def plan(cls, config, longest: int, max_new_tokens: int, prefill_chunk_size: int) -> _Shapes:
        chunk = min(_bucket(prefill_chunk_size, _MIN_BUCKET), _bucket(longest, _MIN_BUCKET))
        # The cache starts with room for the whole generation, or for FIRST_CACHE_LENGTH positions
        # past the prompt if that is less, and doubles whenever it fills: a large max_new_tokens
        # costs neither memory nor (on the XLA path, which reads every slot) time until it is used.
        final_cache_length = min(_bucket(longest + max_new_tokens, _MIN_CACHE), config.max_position_embeddings)
        return cls(
            chunk=chunk, padded_length=-(-longest // chunk) * chunk,
            cache_length=min(_bucket(longest + FIRST_CACHE_LENGTH, _MIN_CACHE), final_cache_length),
            final_cache_length=final_cache_length, buffer=_bucket(max_new_tokens, _MIN_BUCKET),
        )

    def next_cache_length(self, cache_length: int) -> int:
        return min(2 * cache_length, self.final_cache_length)


class GenerationInputError(GptOssError):
    """An argument :func:`generate` cannot run with (empty prompt, too long for the context...)."""


class _DecodeState(NamedTuple):
    step: jax.Array  # tokens sampled so far
    stop_requested: jax.Array  # the streamer asked to stop after the last step
    key: jax.Array
    cache: KVCache  # every position before the last sampled token's
    logits: jax.Array  # [B, V] the last sampled token was drawn from
    positions: jax.Array  # [B] position of the last sampled token (not yet in the cache)
    active: jax.Array  # [B] no stop token yet
    generated: jax.Array  # [B] tokens produced while active
    tokens: jax.Array  # [B, buffer]
    logprobs: jax.Array  # [B, buffer]


def _prefill_chunk(graphdef, state, tokens, positions, cache, last_index, has_last, logits, *, first: bool):
    """Run one prompt chunk; keep the logits of rows whose last prompt token is in it."""
    model = nnx.merge(graphdef, state)
    chunk_logits, cache = model.with_cache(tokens, positions, cache, last_index, cache_is_empty=first)
    return jnp.where(has_last[:, None], chunk_logits, logits), cache


class _Streams:
    """The streamers of the generations running now, each under the id its decode loop carries.

    A compiled loop is shared by every call of its shapes, so its callback cannot be one call's
    streamer: it passes the id, and the callback hands the step to that call's streamer alone.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._next_id = 0
        self._streamers: dict[int, Streamer] = {}
        self._errors: dict[int, BaseException] = {}

    def open(self, streamer: Streamer) -> int:
        with self._lock:
            stream_id, self._next_id = self._next_id, (self._next_id + 1) % (1 << 31)
            self._streamers[stream_id] = streamer
        return stream_id

    def close(self, stream_id: int) -> BaseException | None:
        """Forget a stream; returns what its streamer raised, if it did."""
        with self._lock:
            self._streamers.pop(stream_id, None)
            return self._errors.pop(stream_id, None)

    def emit(self, stream_id: np.ndarray, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Hand one step to its streamer; returns whether to stop (bool scalar)."""
        stream_id = int(stream_id)
        with self._lock:
            streamer = self._streamers[stream_id]
        try:
            stop = bool(streamer(np.asarray(tokens), np.asarray(active)))
        except BaseException as error:  # raised through the runtime it would arrive wrapped and late
            with self._lock:
                self._errors[stream_id] = error
            stop = True
        return np.asarray(stop)


def _decode(graphdef, state, carry: _DecodeState, max_new_tokens, stop_tokens, sampling: SamplingConfig,
            stream_id, *, first: bool, stream: bool, emit: Callable) -> _DecodeState:
    """Sample tokens in a device loop until done or until the cache is full (then it is extended).

    ``first``: the carry is fresh from the prefill, and its logits give the first token.
    ``stream``: hand each step to ``emit(stream_id, tokens, active)`` on the host.
    """
    model = nnx.merge(graphdef, state)
    cache_length = carry.cache.max_length

    def keep_going(carry: _DecodeState) -> jax.Array:
        has_room = jnp.max(carry.positions) < cache_length  # feed_back writes the last token there
        return ~_finished(carry, max_new_tokens) & has_room

    def sample_next(carry: _DecodeState) -> _DecodeState:
        token = sample(carry.logits, jax.random.fold_in(carry.key, carry.step), sampling)
        stop_requested = carry.stop_requested
        if stream:
            stop_requested = io_callback(emit, jax.ShapeDtypeStruct((), jnp.bool_), stream_id, token,
                                         carry.active, ordered=True)
        return carry._replace(
            step=carry.step + 1,
            stop_requested=stop_requested,
            active=carry.active & ~jnp.isin(token, stop_tokens),
            generated=carry.generated + carry.active,
            tokens=carry.tokens.at[:, carry.step].set(token),
            logprobs=carry.logprobs.at[:, carry.step].set(token_logprobs(carry.logits, token)),
        )

    def feed_back(carry: _DecodeState) -> _DecodeState:
        """Run the last sampled token through the model: the logits of the one after it."""
        token = carry.tokens[:, carry.step - 1]
        logits, cache = model.with_cache(token[:, None], carry.positions[:, None], carry.cache)
        return carry._replace(cache=cache, logits=logits[:, 0], positions=carry.positions + 1)

    if first:
        # The first token comes from the prefill's logits; each later one costs one forward, so
        # the last sampled token is never run through the model.
        carry = sample_next(carry)
    return jax.lax.while_loop(keep_going, lambda carry: sample_next(feed_back(carry)), carry)


def _first_carry(cache: KVCache, logits: jax.Array, lengths: jax.Array, buffer: int, seed: int) -> _DecodeState:
    """The decode loop's state after the prefill: ``lengths`` [B] prompt tokens, ``logits`` [B, V]."""
    batch = lengths.shape[0]
    return _DecodeState(
        step=jnp.int32(0), stop_requested=jnp.bool_(False), key=jax.random.key(seed), cache=cache,
        logits=logits, positions=lengths, active=jnp.ones((batch,), bool),
        generated=jnp.zeros((batch,), jnp.int32), tokens=jnp.zeros((batch, buffer), jnp.int32),
        logprobs=jnp.zeros((batch, buffer), jnp.float32),
    )


def _decode_arguments(max_new_tokens: int, stop_tokens: Sequence[int], sampling: SamplingConfig,
                      stream_id: int) -> tuple:
    """The decode program's arguments after its state, as arrays."""
    return (jnp.int32(max_new_tokens), jnp.asarray(np.asarray(stop_tokens, np.int32).reshape(-1)),
            jax.tree.map(jnp.float32, sampling), jnp.int32(stream_id))


def _finished(carry: _DecodeState, max_new_tokens: jax.Array | int) -> jax.Array:
    """Whether decoding is over: max_new_tokens sampled, every row stopped, or the streamer asked."""
    return (carry.step >= max_new_tokens) | ~jnp.any(carry.active) | carry.stop_requested


class Generator:
    """The compiled prefill and decode programs of :func:`generate`, and the streams running on them.

    :func:`generate` shares one (its programs are a cache, like ``jax.jit``'s); pass your own as
    ``generator=`` to keep a set of programs apart. Several threads may generate with one
    generator at once: each call's streamer gets that call's tokens only.
    """

    def __init__(self):
        self.streams = _Streams()
        self.prefill = CompiledByShape(_prefill_chunk, donated("cache"), ("first",))
        self.decode = CompiledByShape(functools.partial(_decode, emit=self.streams.emit), donated("carry"),
                                ("first", "stream"))


_shared_generator: Generator | None = None
_shared_generator_lock = threading.Lock()


def _generator_for(generator: Generator | None) -> Generator:
    global _shared_generator
    if generator is not None:
        return generator
    with _shared_generator_lock:
        if _shared_generator is None:
            _shared_generator = Generator()
        return _shared_generator


def _validate(model: GptOss, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray, jax.Array)):
        raise TypeError("prompts must be a sequence of token-id sequences, e.g. [[1, 2, 3]]")
    if len(prompts) == 0:
        raise GenerationInputError("no prompts given")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GenerationInputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    config = model.config
    arrays = []
    for index, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim == 0:
            raise GenerationInputError("prompts holds token ids, not prompts: wrap one prompt in a list, "
                                       "e.g. [[1, 2, 3]]")
        if ids.ndim != 1:
            raise GenerationInputError(f"prompt {index} must be a flat sequence of token ids, got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise GenerationInputError(f"prompt {index} must hold integer token ids, got {ids.dtype}")
        if ids.size == 0:
            raise GenerationInputError(f"prompt {index} is empty: generation needs at least one token")
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise GenerationInputError(
                f"prompt {index} has token ids outside the vocabulary [0, {config.vocab_size})"
            )
        if ids.size + max_new_tokens > config.max_position_embeddings:
            raise GenerationInputError(
                f"prompt {index} ({ids.size} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {config.max_position_embeddings} tokens"
            )
        arrays.append(ids.astype(np.int32))
    return arrays


def generate(
    model: GptOss,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    return_logprobs: bool = False,
    streamer: Streamer | None = None,
    prefill_chunk_size: int = 512,
    generator: Generator | None = None,
) -> GenerationOutput:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
      model: the model (``gptoss_jax.load`` or ``GptOss``).
      prompts: token ids per prompt; lengths may differ.
      max_new_tokens: the most tokens to generate per prompt.
      temperature: 0 for greedy decoding; OpenAI recommends 1.0 with top_p 1.0.
      top_k: sample among the k most likely tokens only.
      top_p: sample among the most likely tokens holding probability top_p.
      seed: the same seed gives the same tokens.
      stop_tokens: a row ends after producing one of these (it is kept in the output). For
        Harmony chats use ``<|return|>`` and ``<|call|>``, not ``<|end|>``.
      return_logprobs: also return each generated token's log-probability.
      streamer: called with each step's tokens as they come; returning True stops generation
        after that step (see :data:`Streamer`).
      prefill_chunk_size: prompt tokens per prefill step; bounds activation memory. Rounded up
        to a power of two of at least 16 (compiled shapes are bucketed), and no longer than the
        longest prompt's bucket.
      generator: the compiled programs to use (None: the ones every call shares).

    Returns:
      A :class:`GenerationOutput`. With ``max_new_tokens=0`` nothing runs, not even the
      prefill, and the stats are all zero.

    Raises:
      GenerationInputError: a prompt, ``max_new_tokens`` or ``prefill_chunk_size`` that cannot
        run (a ``ValueError``, as are bad sampling settings).
      TypeError: ``prompts`` is not a sequence of token-id sequences, or ``streamer`` is not
        callable.
      Exception: what ``streamer`` raised, as it raised it, once generation stopped after that
        step.
    """
    arrays = _validate(model, prompts, max_new_tokens)
    if streamer is not None and not callable(streamer):
        raise TypeError(f"streamer must be a callable (tokens, active) -> bool | None, got {type(streamer).__name__}")
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    if prefill_chunk_size < 1:
        raise GenerationInputError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
    prompt_count = len(arrays)
    if max_new_tokens == 0:
        return GenerationOutput([[] for _ in arrays], [[] for _ in arrays] if return_logprobs else None,
                                GenerationStats(0, 0.0, 0, 0.0, 0.0))
    if model.mesh is not None:
        # Rows split evenly over the data axis; the extra rows repeat prompt 0 and are dropped.
        arrays += [arrays[0]] * (-prompt_count % model.mesh.shape["data"])
    batch = len(arrays)
    lengths = np.array([a.size for a in arrays], np.int32)
    config = model.config
    longest = int(lengths.max())
    shapes = _Shapes.plan(config, longest, max_new_tokens, prefill_chunk_size)
    chunk, padded_length, cache_length = shapes.chunk, shapes.padded_length, shapes.cache_length
    tokens = np.zeros((batch, padded_length), np.int32)
    for row, ids in enumerate(arrays):
        tokens[row, :ids.size] = ids
    columns = np.arange(padded_length, dtype=np.int32)
    positions = np.where(columns[None] < lengths[:, None], columns[None], -1).astype(np.int32)

    programs = _generator_for(generator)
    compile_seconds = 0.0
    graphdef, state = nnx.split(model)
    cache = KVCache.create(config, batch, cache_length, model.dtype, model.mesh)
    logits = jnp.zeros((batch, config.vocab_size), jnp.float32)
    # One wait at the end: each chunk is dispatched while the one before it runs. (A run that
    # compiles may compile a chunk's program while the one before it runs, which the compile
    # time subtracted then overstates.)
    begin = time.perf_counter()
    for start in range(0, padded_length, chunk):
        last = lengths - 1 - start
        has_last = (last >= 0) & (last < chunk)
        arguments = (state, jnp.asarray(tokens[:, start:start + chunk]), jnp.asarray(positions[:, start:start + chunk]),
                     cache, jnp.asarray(np.clip(last, 0, chunk - 1)), jnp.asarray(has_last), logits)
        (logits, cache), seconds = programs.prefill(graphdef, *arguments, first=start == 0)
        compile_seconds += seconds
    jax.block_until_ready(logits)
    prefill_seconds = time.perf_counter() - begin - compile_seconds

    buffer = shapes.buffer
    stream = streamer is not None
    stream_id = programs.streams.open(streamer) if stream else -1
    streamer_error = None
    try:
        begin = time.perf_counter()
        prefill_compile_seconds = compile_seconds
        carry = _first_carry(cache, logits, jnp.asarray(lengths), buffer, seed)
        arguments = _decode_arguments(max_new_tokens, stop_tokens, sampling, stream_id)
        carry, seconds = programs.decode(graphdef, state, carry, *arguments, first=True, stream=stream)
        compile_seconds += seconds
        # The loop returned because it is over or because the cache is full (a device-to-host read).
        while carry.cache.max_length < shapes.final_cache_length and not _finished(carry, max_new_tokens):
            cache = carry.cache.extended(config, shapes.next_cache_length(carry.cache.max_length))
            carry, seconds = programs.decode(graphdef, state, carry._replace(cache=cache), *arguments,
                                             first=False, stream=stream)
            compile_seconds += seconds
        generated_tokens, logprobs, generated = jax.device_get((carry.tokens, carry.logprobs, carry.generated))
        generated = generated[:prompt_count]
        decode_seconds = time.perf_counter() - begin - (compile_seconds - prefill_compile_seconds)
    finally:
        if stream:
            streamer_error = programs.streams.close(stream_id)
    if streamer_error is not None:
        raise streamer_error

    stats = GenerationStats(
        prefill_tokens=int(lengths[:prompt_count].sum()), prefill_seconds=prefill_seconds,
        decode_tokens=int(generated.sum()), decode_seconds=decode_seconds, compile_seconds=compile_seconds,
    )
    return GenerationOutput(
        tokens=[generated_tokens[row, :n].tolist() for row, n in enumerate(generated)],
        logprobs=[logprobs[row, :n].tolist() for row, n in enumerate(generated)] if return_logprobs else None,
        stats=stats,
    )


class LoweredProgram(NamedTuple):
    """One program of a generation, lowered (:func:`lower_generate`), and its cache's length."""

    lowered: jax.stages.Lowered
    cache_length: int


def lower_generate(
    model: GptOss, batch: int, prompt_length: int, max_new_tokens: int, *, prefill_chunk_size: int = 512,
) -> dict[str, LoweredProgram]:
    """The programs :func:`generate` runs for ``batch`` prompts of ``prompt_length`` tokens, lowered, not run.

    For checking a generation's memory before running it: ``model`` may be abstract
    (:func:`gptoss_jax.checkpoints.parameters.abstract_model`), nothing is allocated, and the
    programs donate their cache as they do on an accelerator (the CPU backend does not reuse
    donated buffers, so :func:`generate` does not ask it to). Greedy sampling without logprobs
    or a streamer, as a benchmark runs.

    Returns:
      By name: ``prefill (first chunk)``, ``prefill (later chunk)`` when the prompt takes more
      than one chunk, ``decode``, and, when the cache grows during the generation, ``cache growth``
      (the last doubling) and ``decode (grown cache)``.
    """
    config = model.config
    if model.mesh is not None:
        batch += -batch % model.mesh.shape["data"]
    shapes = _Shapes.plan(config, prompt_length, max_new_tokens, prefill_chunk_size)
    graphdef, state = nnx.split(model)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    columns = jax.ShapeDtypeStruct((batch, shapes.chunk), jnp.int32)

    def cache_of(length: int) -> KVCache:
        return jax.eval_shape(lambda: KVCache.create(config, batch, length, model.dtype, model.mesh))

    logits = jax.ShapeDtypeStruct((batch, config.vocab_size), jnp.float32)
    prefill = jax.jit(_prefill_chunk, static_argnames=("graphdef", "first"), donate_argnames=("cache",))
    decode = jax.jit(functools.partial(_decode, emit=None), static_argnames=("graphdef", "first", "stream"),
                     donate_argnames=("carry",))
    decode_arguments = jax.eval_shape(lambda: _decode_arguments(max_new_tokens, (), SamplingConfig(temperature=0.0), 0))
    cache = cache_of(shapes.cache_length)
    prefill_arguments = (graphdef, state, columns, columns, cache, rows, jax.ShapeDtypeStruct((batch,), jnp.bool_), logits)
    carry = jax.eval_shape(lambda: _first_carry(cache, logits, jnp.zeros((batch,), jnp.int32), shapes.buffer, 0))
    first, final = shapes.cache_length, shapes.final_cache_length
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        programs = {"prefill (first chunk)": LoweredProgram(prefill.lower(*prefill_arguments, first=True), first)}
        if shapes.padded_length > shapes.chunk:
            programs["prefill (later chunk)"] = LoweredProgram(prefill.lower(*prefill_arguments, first=False), first)
        programs["decode"] = LoweredProgram(
            decode.lower(graphdef, state, carry, *decode_arguments, first=True, stream=False), first)
        if first < final:
            length = first
            while shapes.next_cache_length(length) < final:
                length = shapes.next_cache_length(length)
            growth = jax.jit(lambda cache: cache.extended(config, final))
            programs["cache growth"] = LoweredProgram(growth.lower(cache_of(length)), final)
            grown = carry._replace(cache=cache_of(final))
            programs["decode (grown cache)"] = LoweredProgram(
                decode.lower(graphdef, state, grown, *decode_arguments, first=False, stream=False), final)
    return programs
