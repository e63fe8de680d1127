"""The continuous-batching engine: requests join and leave a running batch of decode slots.

One thread owns the device. Each turn of its loop it admits waiting requests into free slots,
runs one prefill chunk (for up to one row per ``data`` shard), then one decode burst of every
decoding slot, and hands each request its new tokens. So a long prompt delays the running
streams by about one chunk per burst, never by its whole prefill.

Bursts are short (``burst_steps_busy``) while requests wait for a slot or are being prefilled,
so a finishing row frees its slot soon and a new prompt's chunks interleave closely; and long
(``burst_steps``) when nothing waits, so the host's turn between bursts is paid rarely.

Compiled programs: the prefill chunk for each chunk bucket (powers of two from 16 up to
``prefill_chunk``, the first chunk of a prompt and later ones apart), the first-token sampler,
and the decode burst, with and without top-k/top-p filtering and log-probabilities. A mixed
workload compiles at most ``2 * buckets + 4`` model programs; the burst length is traced.

Example::

    engine = Engine(gptoss_jax.load("gpt-oss-20b/"), max_batch=64, max_context=8192)
    handle = engine.submit(prompt_ids, max_tokens=256, temperature=1.0, stop_token_ids=[200002, 200012])
    for delta in handle:            # or: async for delta in handle
        print(delta.tokens)
    print(handle.result().finish_reason)
    engine.close()
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.compiled import CompiledByShape, donated
from gptoss_jax.engine import constraints, programs
from gptoss_jax.engine.requests import (
    MAX_STOP_TOKENS, Delta, EngineClosedError, QueueFullError, RequestError, RequestHandle, SamplingParams,
    TokenLogprob,
)
from gptoss_jax.errors import GptOssError
from gptoss_jax.footprint import MEMORY_FRACTION, device_memory_bytes
from gptoss_jax.kv_cache import KVCache, cache_bytes
from gptoss_jax.model import GptOss
from gptoss_jax.sampling import RowSampling
from gptoss_jax.tokenizer import Tokenizer

_MIN_CHUNK = 16
MAX_SLOTS = 1024
"""The most slots the engine chooses when it sizes itself from memory."""


class EngineSizeError(GptOssError):
    """Slots and context that do not fit beside the parameters; the message gives the figures."""


@dataclasses.dataclass
class _Slot:
    handle: RequestHandle
    order: int  # admission order: the oldest prompt is prefilled first
    chunk: int  # prompt tokens per prefill chunk for this request
    prefilled: int = 0  # prompt tokens in the cache
    decoding: bool = False


def _power_of_two_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _bucket(n: int) -> int:
    return _power_of_two_at_least(n, _MIN_CHUNK)


def _parameter_bytes_per_device(model: GptOss) -> int:
    """Bytes of the model's arrays on its first device (shards of a mesh are even)."""
    total = 0
    for leaf in jax.tree.leaves(nnx.state(model)):
        if isinstance(leaf, jax.Array):
            total += leaf.addressable_shards[0].data.nbytes
    return total


class Engine:
    """Serves requests on a model, batching them continuously.

    Args:
      model: a loaded model (``gptoss_jax.load``), on one device or a mesh.
      max_batch: decode slots (rows of the KV cache); None: as many as fit in
        ``memory_fraction`` of a device beside the parameters. On a mesh, a multiple of its
        ``data`` axis (rows split over it).
      max_context: positions per slot: a request's prompt plus its tokens.
      prefill_chunk: prompt tokens per prefill step (a power of two, at least 16).
      max_queue: requests that may wait for a slot; one more is refused (:class:`QueueFullError`).
      burst_steps: decode steps per device call when no request waits.
      burst_steps_busy: decode steps per call while requests wait or are being prefilled.
      memory_fraction: the share of a device's memory the parameters and the cache may take; the
        rest is for the programs' temporaries.
      tokenizer: the model's tokenizer; requests with ``json_schema``, ``regex``, ``grammar`` or
        ``thinking_token_budget`` need it. While such a request is steered outside free text,
        bursts are one step long (its next token mask depends on its last token) and the other
        rows decode beside it one step per turn (see :mod:`gptoss_jax.engine.constraints`).

    Raises:
      EngineSizeError: slots and context that do not fit, with the figures.
    """

    def __init__(self, model: GptOss, *, max_batch: int | None = 16, max_context: int = 4096,
                 prefill_chunk: int = 256, max_queue: int = 1024, burst_steps: int = 16, burst_steps_busy: int = 4,
                 memory_fraction: float = MEMORY_FRACTION, tokenizer: Tokenizer | None = None):
        config = model.config
        self.model = model
        self.data_shards = 1 if model.mesh is None else model.mesh.shape["data"]
        """Rows split over the mesh's data axis: prefill groups and decode buckets are multiples of it."""
        if not 1 <= max_context <= config.max_position_embeddings:
            raise EngineSizeError(f"max_context must be from 1 to the model's {config.max_position_embeddings}, "
                                  f"got {max_context}")
        if prefill_chunk < _MIN_CHUNK or prefill_chunk & (prefill_chunk - 1):
            raise EngineSizeError(f"prefill_chunk must be a power of two >= {_MIN_CHUNK}, got {prefill_chunk}")
        for name, steps in (("burst_steps", burst_steps), ("burst_steps_busy", burst_steps_busy)):
            if not 1 <= steps <= programs.MAX_BURST:
                raise EngineSizeError(f"{name} must be from 1 to {programs.MAX_BURST}, got {steps}")
        if max_queue < 1:
            raise EngineSizeError(f"max_queue must be >= 1, got {max_queue}")
        self.max_context = max_context
        self.max_batch = self._checked_batch(max_batch, memory_fraction)
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.burst_steps, self.burst_steps_busy = burst_steps, burst_steps_busy
        self.tokenizer = tokenizer

        slots = self.max_batch
        self._graphdef, self._state = nnx.split(model)
        self._cache = KVCache.create(config, slots, max_context, model.dtype, model.mesh)
        self._prefill = CompiledByShape(programs.prefill_chunk, donated("cache"), ("first",))
        self._decode = CompiledByShape(programs.decode_burst, donated("cache"), ("logprobs",))
        self._first_tokens = jax.jit(programs.first_tokens, static_argnames="logprobs")
        self.compile_seconds = 0.0

        # Each slot's decoding state and settings, on the host: a burst takes them as arguments.
        self._rows = programs.Rows(
            last_tokens=np.zeros(slots, np.int32), positions=np.zeros(slots, np.int32),
            active=np.zeros(slots, bool), generated=np.zeros(slots, np.int32), max_tokens=np.ones(slots, np.int32),
            stop_tokens=np.full((slots, MAX_STOP_TOKENS + 1), -1, np.int32),  # the last: a steered row's pause
        )
        self._temperature = np.ones(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._keys = np.zeros((slots, *jax.random.key_data(jax.random.key(0)).shape), np.uint32)

        self._slots: list[_Slot | None] = [None] * slots
        self._steering: list[constraints.RowSteering | None] = [None] * slots
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._condition = threading.Condition()
        self._closing = False
        self._failure: BaseException | None = None
        self._request_ids = itertools.count()
        self._admissions = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="gptoss-jax-engine", daemon=True)
        self._thread.start()

    # --- public ----------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int] | np.ndarray, params: SamplingParams | None = None,
               **settings) -> RequestHandle:
        """Queue a prompt (token ids); returns its handle at once. Thread-safe.

        Settings are a :class:`SamplingParams` or its fields as keywords (``max_tokens=64,
        temperature=0, ...``).

        Raises:
          RequestError: an empty prompt, ids outside the vocabulary, a prompt and ``max_tokens``
            beyond ``max_context``, or bad settings. Nothing running is disturbed.
          QueueFullError: ``max_queue`` requests already wait.
          EngineClosedError: the engine was closed or failed.
        """
        if params is None:
            params = SamplingParams(**settings)
        elif settings:
            raise TypeError("pass settings either as a SamplingParams or as keywords, not both")
        ids = self._checked_prompt(prompt)
        params = params.checked(ids.size, self.max_context, self.model.config.vocab_size)
        steering = constraints.steering_for(params, self.tokenizer)
        with self._condition:
            if self._closing or self._failure is not None:
                raise EngineClosedError("the engine is closed" if self._failure is None
                                        else f"the engine failed: {self._failure}") from self._failure
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (max_queue={self.max_queue})")
            handle = RequestHandle(next(self._request_ids), ids, params)
            handle._engine_wake = self._wake
            handle._steering = steering
            self._waiting.append(handle)
            self._condition.notify_all()
        return handle

    @property
    def running(self) -> int:
        """Requests in a slot (being prefilled or decoding)."""
        return sum(slot is not None for slot in self._slots)

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    @property
    def programs(self) -> int:
        """Model programs compiled so far (prefill chunks and decode bursts)."""
        return self._prefill.programs + self._decode.programs

    def close(self, timeout: float | None = None) -> None:
        """Stop the engine: waiting and running requests end with :class:`EngineClosedError`."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- the engine's thread ------------------------------------------------------------------

    def _wake(self) -> None:
        with self._condition:
            self._condition.notify_all()

    def _loop(self) -> None:
        try:
            while self._turn():
                pass
            error: BaseException = EngineClosedError("the engine was closed before the request finished")
        except BaseException as failure:  # the device or a program failed: every request must hear of it
            with self._condition:
                self._failure = failure
            error = EngineClosedError(f"the engine failed: {failure}")
            error.__cause__ = failure
        with self._condition:
            handles = [slot.handle for slot in self._slots if slot is not None] + list(self._waiting)
            self._slots = [None] * self.max_batch
            self._waiting.clear()
        for handle in handles:
            handle._fail(error)

    def _turn(self) -> bool:
        """One turn: admit, drop the cancelled, one prefill chunk, one decode burst. False: closing."""
        with self._condition:
            self._condition.wait_for(lambda: self._closing or self._waiting or self.running)
            if self._closing:
                return False
            self._admit()
        self._drop_cancelled()
        self._prefill_one_chunk()
        if self._rows.active.any():
            self._decode_one_burst()
        return True

    def _admit(self) -> None:
        """Move waiting requests into free slots (called with the lock held)."""
        for index, slot in enumerate(self._slots):
            while slot is None and self._waiting:
                handle = self._waiting.popleft()
                if handle.cancel_requested:
                    handle._finish("cancelled")
                    continue
                slot = _Slot(handle, next(self._admissions), min(self.prefill_chunk, _bucket(handle.prompt.size)))
                self._slots[index] = slot
                self._set_settings(index, handle.params)
                self._steering[index] = handle._steering

    def _set_settings(self, index: int, params: SamplingParams) -> None:
        self._temperature[index] = params.temperature
        self._top_k[index] = params.top_k or 0
        self._top_p[index] = params.top_p
        self._keys[index] = jax.random.key_data(jax.random.key(params.seed))
        self._rows.max_tokens[index] = params.max_tokens
        self._rows.stop_tokens[index] = -1
        self._rows.stop_tokens[index, :len(params.stop_token_ids)] = params.stop_token_ids

    def _drop_cancelled(self) -> None:
        for index, slot in enumerate(self._slots):
            if slot is not None and slot.handle.cancel_requested:
                self._release(index, "cancelled")

    def _release(self, index: int, reason: str) -> None:
        handle = self._slots[index].handle
        self._rows.active[index] = False
        self._steering[index] = None
        with self._condition:
            self._slots[index] = None
        handle._finish(reason)

    def _sampling(self, slots: np.ndarray, live: np.ndarray) -> RowSampling:
        """The settings of ``slots``; the static choices follow the ``live`` ones (bool mask) only."""
        sampling_rows = (self._temperature[slots] > 0) & live
        filters = bool(np.any(sampling_rows & ((self._top_k[slots] > 0) | (self._top_p[slots] < 1))))
        return RowSampling(jnp.asarray(self._temperature[slots]), jnp.asarray(self._top_k[slots]),
                           jnp.asarray(self._top_p[slots]), jax.random.wrap_key_data(jnp.asarray(self._keys[slots])),
                           bool(sampling_rows.any()), filters)

    def _prefill_one_chunk(self) -> None:
        """Run the next chunk of the oldest prompts (one row per data shard) that share a chunk shape."""
        pending = sorted((slot.order, index) for index, slot in enumerate(self._slots)
                         if slot is not None and not slot.decoding)
        if not pending:
            return
        oldest = self._slots[pending[0][1]]
        shape = (oldest.chunk, oldest.prefilled == 0)
        group = [index for _, index in pending
                 if (self._slots[index].chunk, self._slots[index].prefilled == 0) == shape][:self.data_shards]
        chunk, first = shape
        padded = self.data_shards
        slots = np.full(padded, self.max_batch, np.int32)  # past the last slot: padding, writes dropped
        tokens = np.zeros((padded, chunk), np.int32)
        positions = np.full((padded, chunk), -1, np.int32)
        last_index = np.zeros(padded, np.int32)
        for row, index in enumerate(group):
            slot = self._slots[index]
            prompt, start = slot.handle.prompt, slot.prefilled
            piece = prompt[start:start + chunk]
            slots[row] = index
            tokens[row, :piece.size] = piece
            positions[row, :piece.size] = np.arange(start, start + piece.size)
            last_index[row] = min(prompt.size - 1 - start, chunk - 1)
        (logits, self._cache), seconds = self._prefill(
            self._graphdef, self._state, self._cache, jnp.asarray(slots), jnp.asarray(tokens), jnp.asarray(positions),
            jnp.asarray(last_index), first=first)
        self.compile_seconds += seconds
        finished = []
        for row, index in enumerate(group):
            slot = self._slots[index]
            slot.prefilled = min(slot.prefilled + chunk, slot.handle.prompt.size)
            if slot.prefilled == slot.handle.prompt.size:
                finished.append((row, index))
        if finished:
            self._start_decoding(logits, slots, finished)

    def _start_decoding(self, logits: jax.Array, slots: np.ndarray, finished: list[tuple[int, int]]) -> None:
        """Sample the first token of each row whose prompt is in, and hand it over."""
        sampling_slots = np.minimum(slots, self.max_batch - 1)
        wants_logprobs = any(self._slots[index].handle.params.logprobs for _, index in finished)
        live = np.isin(np.arange(slots.size), [row for row, _ in finished])
        steerings = [None] * slots.size
        for row, index in finished:
            steerings[row] = self._steering[index]
        masks = constraints.step_masks(steerings, self.model.config.vocab_size)
        tokens, logprobs = jax.device_get(self._first_tokens(logits, self._sampling(sampling_slots, live),
                                                             None if masks is None else jnp.asarray(masks),
                                                             logprobs=wants_logprobs))
        if logprobs is not None:  # one step per row, as a burst's are laid out
            logprobs = programs.TokenLogprobs(*(np.expand_dims(part, 1) for part in logprobs))
        now = time.perf_counter()
        for row, index in finished:
            slot = self._slots[index]
            slot.decoding = True
            token = int(tokens[row])
            rows = self._rows
            rows.last_tokens[index], rows.positions[index] = token, slot.handle.prompt.size
            rows.generated[index], rows.active[index] = 1, True
            if self._steering[index] is not None:
                self._steering[index].accept(token)
            self._hand_over(index, [token], logprobs, row, np.array([0]), now)
            if token in slot.handle.params.stop_token_ids:
                self._release(index, "stop")
            elif slot.handle.params.max_tokens == 1:
                self._release(index, "length")

    def _decode_one_burst(self) -> None:
        """One burst of the decoding slots, gathered into the smallest bucket (a power of two) that holds them."""
        busy = bool(self._waiting) or any(slot is not None and not slot.decoding for slot in self._slots)
        steps = self.burst_steps_busy if busy else self.burst_steps
        decoding = np.flatnonzero(self._rows.active)
        shards = self.data_shards  # rows split evenly over them
        size = min(self.max_batch, shards * _power_of_two_at_least(-(-decoding.size // shards), 1))
        slots = np.full(size, self.max_batch, np.int32)  # past the last slot: padding, writes dropped
        slots[:decoding.size] = decoding
        taken = np.minimum(slots, self.max_batch - 1)
        live = np.arange(size) < decoding.size
        steerings = [self._steering[index] for index in decoding] + [None] * (size - decoding.size)
        steps = constraints.burst_steps(steerings, steps)
        masks = constraints.step_masks(steerings, self.model.config.vocab_size)
        rows = programs.Rows(*(np.where(live.reshape(-1, *[1] * (field.ndim - 1)), field[taken], 0).astype(field.dtype)
                               for field in self._rows))
        pauses = constraints.pause_tokens(steerings)
        rows.stop_tokens[:, -1] = pauses
        wants_logprobs = any(self._slots[index].handle.params.logprobs for index in decoding)
        burst, seconds = self._decode(self._graphdef, self._state, self._cache, jnp.asarray(slots),
                                      jax.tree.map(jnp.asarray, rows), self._sampling(taken, live),
                                      jnp.int32(steps), None if masks is None else jnp.asarray(masks),
                                      logprobs=wants_logprobs)
        self.compile_seconds += seconds
        self._cache = burst.cache
        new_rows, tokens, valid, logprobs = jax.device_get((burst.rows, burst.tokens, burst.valid, burst.logprobs))
        now = time.perf_counter()
        for field, new in zip(self._rows, new_rows):
            field[decoding] = new[:decoding.size]
        self._rows.stop_tokens[decoding, -1] = -1
        for row, index in enumerate(decoding):
            slot = self._slots[index]
            steps_valid = np.flatnonzero(valid[row])
            if self._steering[index] is not None:
                for token in tokens[row, steps_valid].tolist():
                    self._steering[index].accept(token)
            self._hand_over(index, tokens[row, steps_valid].tolist(), logprobs, row, steps_valid, now)
            if not self._rows.active[index]:
                last = int(tokens[row, steps_valid[-1]])
                stopped = last in slot.handle.params.stop_token_ids
                if last == pauses[row] and not stopped and self._rows.generated[index] < self._rows.max_tokens[index]:
                    self._rows.active[index] = True  # paused where its grammar's free text ended: steered again
                else:
                    self._release(index, "stop" if stopped else "length")

    def _hand_over(self, index: int, tokens: list[int], logprobs: programs.TokenLogprobs | None, row: int,
                   steps: np.ndarray, now: float) -> None:
        """Push a row's new tokens (with their log-probabilities, if it asked) to its handle."""
        params = self._slots[index].handle.params
        entries = None
        if params.logprobs:
            chosen, top_ids, top_values = (part[row][steps] for part in logprobs)
            count = params.top_logprobs
            entries = [
                TokenLogprob(token, float(chosen[i]),
                             tuple(zip(top_ids[i, :count].tolist(), top_values[i, :count].tolist())))
                for i, token in enumerate(tokens)
            ]
        self._slots[index].handle._push(Delta(tokens, entries, now))

    def _checked_batch(self, max_batch: int | None, memory_fraction: float) -> int:
        model, config, data = self.model, self.model.config, self.data_shards
        parameters = _parameter_bytes_per_device(model)
        available = memory_fraction * device_memory_bytes(jax.local_devices()[0])
        per_row = cache_bytes(config, data, self.max_context, model.dtype, model.mesh) / data
        if max_batch is None:
            fitting = int((available - parameters) // per_row) if available > parameters else 0
            max_batch = min(MAX_SLOTS, fitting - fitting % data)
            if max_batch < data:
                raise EngineSizeError(
                    f"no KV cache of {self.max_context} positions fits beside the parameters "
                    f"({parameters / 1e9:.2f} GB) in {memory_fraction:.0%} of the device's "
                    f"{available / memory_fraction / 1e9:.1f} GB; lower max_context")
            return max_batch
        if max_batch < 1 or max_batch % data:
            raise EngineSizeError(f"max_batch must be a positive multiple of the mesh's data axis ({data}), "
                                  f"got {max_batch}")
        cache = cache_bytes(config, max_batch, self.max_context, model.dtype, model.mesh)
        if parameters + cache > available:
            raise EngineSizeError(
                f"a KV cache of {max_batch} rows x {self.max_context} positions takes {cache / 1e9:.2f} GB per "
                f"device; with the parameters ({parameters / 1e9:.2f} GB) that is over {memory_fraction:.0%} "
                f"of the device's {available / memory_fraction / 1e9:.1f} GB; lower max_batch or max_context")
        return max_batch

    def _checked_prompt(self, prompt) -> np.ndarray:
        if isinstance(prompt, (str, bytes)):
            raise RequestError("the prompt must be token ids, not text: encode it with the tokenizer first")
        ids = np.asarray(prompt)
        if ids.ndim != 1:
            raise RequestError(f"the prompt must be a flat sequence of token ids, got shape {ids.shape}")
        if ids.size == 0:
            raise RequestError("the prompt is empty: generation needs at least one token")
        if not np.issubdtype(ids.dtype, np.integer):
            raise RequestError(f"the prompt must hold integer token ids, got {ids.dtype}")
        vocab = self.model.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise RequestError(f"the prompt has token ids outside the vocabulary [0, {vocab})")
        if ids.size + 1 > self.max_context:
            raise RequestError(f"the prompt ({ids.size} tokens) leaves no room for a token in the engine's context "
                               f"of {self.max_context}")
        return ids.astype(np.int32)
