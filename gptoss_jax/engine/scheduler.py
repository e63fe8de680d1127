"""The continuous-batching engine: requests join and leave a running batch of decode slots.

One thread owns the device. Each turn of its loop it admits waiting requests into free slots,
starts their prompts, runs one prefill call, then one decode burst of every decoding slot, and
hands each request its new tokens. A prefill call takes the next chunk of as many waiting prompts
as ``prefill_budget`` tokens hold (:mod:`gptoss_jax.engine.prefill`), so many short prompts are
in after one call and a long prompt delays the running streams by about one budget per burst,
never by its whole prefill.

A prompt is computed once (:mod:`gptoss_jax.engine.prefix_cache`): a new prompt restores its
longest cached prefix from the pool of blocks (prompts' blocks are kept there as their chunks
complete them, and a finished request's prompt and reply when it ends); one equal to a prompt being prefilled waits for it and copies its slot; one whose
next block another slot is computing waits for that block.

Bursts are short (``burst_steps_busy``) while requests wait for a slot or are being prefilled,
so a finishing row frees its slot soon and a new prompt's chunks interleave closely; and long
(``burst_steps``) when nothing waits, so the host's turn between bursts is paid rarely.

Compiled programs: a prefill call for each shape (rows and chunk width, both powers of two; all
first chunks or all later ones), the first-token sampler, and the decode burst, with and without
top-k/top-p filtering and log-probabilities: at most ``2 * row_buckets * width_buckets + 4`` model
programs, fewer where ``rows * width`` passes the budget; the burst length is traced. The prefix
cache adds small copy programs: a restore per bucket of block counts, a save and a slot copy per
bucket of rows.

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
from gptoss_jax.engine import constraints, prefill, prefix_cache, programs, sizing
from gptoss_jax.engine.requests import (
    MAX_STOP_TOKENS, Delta, EngineClosedError, QueueFullError, RequestHandle, SamplingParams, TokenLogprob,
    checked_prompt,
)
from gptoss_jax.engine.prefix_cache import BlockPool, PrefixIndex
from gptoss_jax.engine.sizing import EngineSizeError
from gptoss_jax.footprint import MEMORY_FRACTION
from gptoss_jax.kv_cache import KVCache
from gptoss_jax.model import GptOss
from gptoss_jax.sampling import RowSampling
from gptoss_jax.tokenizer import Tokenizer


@dataclasses.dataclass(eq=False)  # slots are told apart by identity (a follower's leader)
class _Slot:
    handle: RequestHandle
    order: int  # admission order: the oldest prompt is prefilled first
    prefilled: int = 0  # prompt tokens in the cache
    decoding: bool = False
    started: bool = False  # its prompt is being prefilled, restored or copied (not waiting for another's blocks)
    leader: _Slot | None = None  # a slot prefilling the same prompt, whose cache row this one copies
    digests: list[bytes] = dataclasses.field(default_factory=list)  # the prompt's block chain


_power_of_two_at_least = prefill.power_of_two_at_least


class Engine:
    """Serves requests on a model, batching them continuously.

    Args:
      model: a loaded model (``gptoss_jax.load``), on one device or a mesh.
      max_batch: decode slots (rows of the KV cache); None: as many as fit in
        ``memory_fraction`` of a device beside the parameters. On a mesh, a multiple of its
        ``data`` axis (rows split over it).
      max_context: positions per slot: a request's prompt plus its tokens.
      prefill_chunk: the most prompt tokens of one request per prefill call (a power of two, at
        least 16). With the prefix cache on, every block a chunk completes is kept.
      prefill_budget: the most tokens (rows x chunk width, padding included) one prefill call
        runs: it takes the next chunks of as many waiting prompts as fit (at least
        ``prefill_chunk``).
      prefix_caching: keep prompts' KV in a pool of blocks and restore the longest cached prefix
        of each new prompt instead of computing it (:mod:`gptoss_jax.engine.prefix_cache`).
      prefix_cache_bytes: the pool's size per device; None: ``POOL_SHARE`` of the memory left in
        ``memory_fraction`` after the parameters and the slots, at most
        ``MAX_BLOCKS_PER_SLOT_CONTEXT`` slots' worth of context.
      prefix_block: tokens per block (a multiple of the model's sliding window and of 16).
      max_queue: requests that may wait for a slot; one more is refused (:class:`QueueFullError`).
      burst_steps: decode steps per device call when no request waits.
      burst_steps_busy: decode steps per call while requests wait or are being prefilled.
      memory_fraction: the share of a device's memory the parameters and the cache may take; the
        rest is for the programs' temporaries.
      tokenizer: the model's tokenizer; requests with ``json_schema``, ``regex``, ``grammar`` or
        ``thinking_token_budget`` need it. While such a request is steered outside free text,
        its next token mask depends on its last token: the burst calls the host back at each
        step for the steered rows' masks, and the other rows keep their multi-step bursts (see
        :mod:`gptoss_jax.engine.constraints`).

    Raises:
      EngineSizeError: slots and context that do not fit, with the figures.
    """

    def __init__(self, model: GptOss, *, max_batch: int | None = 16, max_context: int = 4096,
                 prefill_chunk: int = 256, prefill_budget: int = 2048, max_queue: int = 1024, burst_steps: int = 16,
                 burst_steps_busy: int = 4, memory_fraction: float = MEMORY_FRACTION, prefix_caching: bool = True,
                 prefix_cache_bytes: int | None = None, prefix_block: int = prefix_cache.DEFAULT_BLOCK_TOKENS,
                 tokenizer: Tokenizer | None = None):
        config = model.config
        self.model = model
        self.data_shards = 1 if model.mesh is None else model.mesh.shape["data"]
        """Rows split over the mesh's data axis: prefill groups and decode buckets are multiples of it."""
        if not 1 <= max_context <= config.max_position_embeddings:
            raise EngineSizeError(f"max_context must be from 1 to the model's {config.max_position_embeddings}, "
                                  f"got {max_context}")
        if prefill_chunk < prefill.MIN_CHUNK or prefill_chunk & (prefill_chunk - 1):
            raise EngineSizeError(f"prefill_chunk must be a power of two >= {prefill.MIN_CHUNK}, got {prefill_chunk}")
        if prefill_budget < prefill_chunk * self.data_shards:
            raise EngineSizeError(f"prefill_budget must hold a chunk per data shard ({prefill_chunk} x "
                                  f"{self.data_shards}), got {prefill_budget}")
        if prefix_block % config.sliding_window or prefix_block % prefill.MIN_CHUNK:
            raise EngineSizeError(f"prefix_block must be a multiple of the sliding window ({config.sliding_window}) "
                                  f"and of {prefill.MIN_CHUNK}, got {prefix_block}")
        for name, steps in (("burst_steps", burst_steps), ("burst_steps_busy", burst_steps_busy)):
            if not 1 <= steps <= programs.MAX_BURST:
                raise EngineSizeError(f"{name} must be from 1 to {programs.MAX_BURST}, got {steps}")
        if max_queue < 1:
            raise EngineSizeError(f"max_queue must be >= 1, got {max_queue}")
        self.max_context = max_context
        self.max_batch = sizing.slots_that_fit(model, max_context, max_batch, memory_fraction)
        self.prefill_chunk, self.prefill_budget = prefill_chunk, prefill_budget
        self.max_queue = max_queue
        self.burst_steps, self.burst_steps_busy = burst_steps, burst_steps_busy
        self.tokenizer = tokenizer

        slots = self.max_batch
        self._graphdef, self._state = nnx.split(model)
        self._cache = KVCache.create(config, slots, max_context, model.dtype, model.mesh)
        self._prefill = CompiledByShape(programs.prefill_chunk, donated("cache") + donated("pool"), ("first",))
        self._decode = CompiledByShape(programs.decode_burst, donated("cache"), ("logprobs", "next_masks"))
        self._first_tokens = jax.jit(programs.first_tokens, static_argnames="logprobs")
        # Copies between the cache and the prefix pool: small programs, compiled by jit as they come.
        self._copy_rows = jax.jit(prefix_cache.copy_rows, donate_argnames=donated("cache"))
        self._restore = jax.jit(prefix_cache.restore_prefix, donate_argnames=donated("cache"))
        self._save = jax.jit(prefix_cache.save_blocks, donate_argnames=donated("pool"))
        self.prompt_tokens = 0
        """Prompt tokens admitted so far."""
        self.cached_prompt_tokens = 0
        """Of those, the ones taken from the prefix cache or from a slot prefilling the same prompt, not computed."""
        self.compile_seconds = 0.0
        self.prefix_block = prefix_block
        self._pool: BlockPool | None = None
        self.prefix_index: PrefixIndex | None = None
        """The prefix cache's index (its counters and use); None when the cache is off."""
        if prefix_caching and max_context > prefix_block:  # else no block and a token to compute fit a slot
            blocks = sizing.pool_blocks(model, self.max_batch, max_context, prefix_block, prefix_cache_bytes,
                                        memory_fraction)
            self._pool = prefix_cache.create_pool(config, blocks, prefix_block, model.dtype, model.mesh)
            self.prefix_index = PrefixIndex(blocks)

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
        # The running burst's steerings by row, its first masks and the tokens its callbacks have
        # handed each row's steering (see _steer_step).
        self._burst_steerings: list[constraints.RowSteering | None] = []
        self._burst_masks: programs.RowMasks | None = None
        self._burst_accepted = np.zeros(0, np.int32)
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
        ids = checked_prompt(prompt, self.model.config.vocab_size, self.max_context)
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
        """Model programs compiled so far (prefill calls and decode bursts)."""
        return self._prefill.programs + self._decode.programs

    @property
    def copy_programs(self) -> int:
        """Programs compiled so far that copy KV between the prefix pool and slots, or between slots."""
        return sum(program._cache_size() for program in (self._restore, self._save, self._copy_rows))

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
        """One turn: admit, drop the cancelled, one prefill call, one decode burst. False: closing."""
        with self._condition:
            self._condition.wait_for(lambda: self._closing or self._waiting or self.running)
            if self._closing:
                return False
            self._admit()
        self._drop_cancelled()
        self._start_prompts()
        self._prefill_one_call()
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
                slot = _Slot(handle, next(self._admissions))
                self._slots[index] = slot
                self._set_settings(index, handle.params)
                self._steering[index] = handle._steering

    def _start_prompts(self) -> None:
        """Start the prompts of newly admitted slots, each computed once.

        A prompt equal to one a slot is prefilling follows that slot (it copies the slot's row
        once the prompt is in). Otherwise it restores its longest cached prefix, unless another
        slot is computing its next block: then it waits for that block, a turn at a time.
        """
        computing = {digest for slot in self._slots if slot is not None and slot.started and not slot.decoding
                     for digest in slot.digests[slot.prefilled // self.prefix_block:]}
        for index, slot in enumerate(self._slots):
            if slot is None or slot.started:
                continue
            prompt = slot.handle.prompt
            leader = next((other for other in self._slots if other is not None and other.started
                           and other.leader is None and not other.decoding and np.array_equal(other.handle.prompt,
                                                                                              prompt)), None)
            if self.prefix_index is not None and not slot.digests:  # also a follower's: it may lose its leader
                slot.digests = prefix_cache.block_digests(prompt, self.prefix_block)
            if leader is None and self.prefix_index is not None:
                hit = self.prefix_index.longest_prefix(slot.digests, prompt, self.prefix_block)
                whole = 0 if hit is None else hit.ring_end // self.prefix_block
                if whole < len(slot.digests) and slot.digests[whole] in computing:
                    continue
                if hit is not None:
                    self._restore_prefix(index, hit)
                    slot.prefilled = hit.length
                    self._record_cached(index, hit.length)
            slot.started, slot.leader = True, leader
            self.prompt_tokens += prompt.size
            computing.update(slot.digests[slot.prefilled // self.prefix_block:])

    def _record_cached(self, index: int, tokens: int) -> None:
        self._slots[index].handle.cached_tokens = tokens
        self.cached_prompt_tokens += tokens

    def _restore_prefix(self, index: int, hit: prefix_cache.Hit) -> None:
        most = self.max_context // self.prefix_block
        padded = np.zeros(min(most, _power_of_two_at_least(len(hit.blocks), 1)), np.int32)
        padded[:len(hit.blocks)] = hit.blocks
        self.prefix_index.pin(hit.blocks)  # the index never hands a pinned block to a save
        self._cache = self._restore(self._cache, self._pool, jnp.int32(index), jnp.asarray(padded),
                                    jnp.int32(hit.length), jnp.int32(hit.ring_end))
        self.prefix_index.unpin(hit.blocks)

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
        released = self._slots[index]
        if reason != "cancelled" and released.decoding:
            self._save_finished(index)
        self._rows.active[index] = False
        self._steering[index] = None
        for slot in self._slots:
            if slot is not None and slot.leader is released:  # its followers prefill for themselves
                slot.leader = None
        with self._condition:
            self._slots[index] = None
        released.handle._finish(reason)

    def _sampling(self, slots: np.ndarray, live: np.ndarray) -> RowSampling:
        """The settings of ``slots``; the static choices follow the ``live`` ones (bool mask) only."""
        sampling_rows = (self._temperature[slots] > 0) & live
        filters = bool(np.any(sampling_rows & ((self._top_k[slots] > 0) | (self._top_p[slots] < 1))))
        return RowSampling(jnp.asarray(self._temperature[slots]), jnp.asarray(self._top_k[slots]),
                           jnp.asarray(self._top_p[slots]), jax.random.wrap_key_data(jnp.asarray(self._keys[slots])),
                           bool(sampling_rows.any()), filters)

    def _next_chunk(self, index: int) -> prefill.Chunk:
        slot = self._slots[index]
        start, size = slot.prefilled, slot.handle.prompt.size
        return prefill.Chunk(index, slot.handle.prompt, start, min(start + self.prefill_chunk, size), first=start == 0)

    def _prefill_one_call(self) -> None:
        """Run the next chunks of the oldest waiting prompts, as many as the budget holds, in one call."""
        pending = sorted((slot.order, index) for index, slot in enumerate(self._slots)
                         if slot is not None and slot.started and not slot.decoding and slot.leader is None)
        if not pending:
            return
        call = prefill.plan_call([self._next_chunk(index) for _, index in pending], self.prefill_budget,
                                 self.data_shards, self.max_batch, pad_slot=self.max_batch)
        arrays = [jnp.asarray(array) for array in (call.slots, call.tokens, call.positions, call.last_index)]
        saves = None if self.prefix_index is None else self._completed_blocks(call)
        if saves is None:
            (logits, self._cache), seconds = self._prefill(self._graphdef, self._state, self._cache, *arrays,
                                                           first=call.first)
        else:
            (logits, self._cache, self._pool), seconds = self._prefill(
                self._graphdef, self._state, self._cache, *arrays, self._pool, jax.tree.map(jnp.asarray, saves),
                first=call.first)
            self.prefix_index.unpin(saves.blocks[saves.blocks < self.prefix_index.capacity].tolist())
        self.compile_seconds += seconds
        finished = []
        for row, chunk in enumerate(call.chunks):
            slot = self._slots[chunk.slot]
            slot.prefilled = chunk.end
            if slot.prefilled == slot.handle.prompt.size:
                finished += [(row, chunk.slot)] + [(row, index) for index, other in enumerate(self._slots)
                                                   if other is not None and other.leader is slot]
        if finished:
            self._start_decoding(logits, finished)

    def _completed_blocks(self, call: prefill.PrefillCall) -> programs.BlockSaves | None:
        """The blocks ``call``'s chunks complete that the pool lacks, each given a pool block (pinned
        until the call has written it), padded to a length the call's shape fixes; None when there
        are none (the call then runs without the pool, which the CPU backend would copy)."""
        block = self.prefix_block
        saves = []
        for row, chunk in enumerate(call.chunks):
            digests = self._slots[chunk.slot].digests
            for index in range(chunk.start // block, chunk.end // block):  # the blocks ending in (start, end]
                if not self.prefix_index.complete(digests[index]):
                    self._claim(saves, row, index * block, self.prefix_index.allocate(digests[index]))
            self.prefix_index.touch(digests[:chunk.end // block])
        if not saves:
            return None
        count = call.slots.size * (call.tokens.shape[1] // block + 1)  # at most a chunk's blocks + 1 a row
        rows, starts, blocks = (np.full(count, pad, np.int32) for pad in (0, 0, self.prefix_index.capacity))
        rows[:len(saves)], starts[:len(saves)], blocks[:len(saves)] = zip(*saves)
        return programs.BlockSaves(rows, starts, blocks)

    def _save_finished(self, index: int) -> None:
        """Keep what a finished request's cache row holds: its prompt and all but its last generated token.

        The row holds positions ``[0, q)`` with its rings at ``q``: the blocks not cached yet go to
        the pool as interior blocks (complete if one ends at ``q``), ``[last block end, q)`` as a
        tail, so the next round of a conversation, which repeats the reply, restores it.
        """
        if self.prefix_index is None:
            return
        handle = self._slots[index].handle
        q = int(self._rows.positions[index])
        generated = [token for delta in handle._deltas for token in delta.tokens]
        tokens = np.concatenate([handle.prompt, np.asarray(generated[:q - handle.prompt.size], np.int32)])
        digests = prefix_cache.block_digests(tokens, self.prefix_block)
        self.prefix_index.touch(digests)
        chain = self.prefix_index.blocks(digests)
        self.prefix_index.pin(chain)  # its own blocks are not evicted for its tail
        saves = []
        for block, digest in enumerate(digests):
            ends_here = (block + 1) * self.prefix_block == q
            if digest not in self.prefix_index or (ends_here and not self.prefix_index.complete(digest)):
                self._claim(saves, index, block * self.prefix_block, self.prefix_index.allocate(digest, not ends_here))
        start = len(digests) * self.prefix_block
        if start < q and start + self.prefix_block <= self.max_context:  # the tail's block fits a slot's rows
            self._claim(saves, index, start, self.prefix_index.allocate_tail(digests[-1] if digests else b"",
                                                                             tokens[start:q]))
        self.prefix_index.unpin(chain)
        self._write_pool(saves)

    def _claim(self, saves: list[tuple[int, int, int]], index: int, start: int, block: int | None) -> None:
        """Add a save of row ``index`` (a slot, or a prefill call's row) from ``start`` to pool block
        ``block`` (None: none allocated).

        The block stays pinned until the save is written, so a later allocation of the same
        save program does not take it.
        """
        if block is not None:
            self.prefix_index.pin([block])
            saves.append((index, start, block))

    def _write_pool(self, saves: list[tuple[int, int, int]]) -> None:
        """One save program for (slot, first position, pool block) rows; unpins their blocks."""
        self.prefix_index.unpin([block for _, _, block in saves])
        if not saves:
            return
        rows = _power_of_two_at_least(len(saves), 1)
        slots, starts, blocks = (np.full(rows, pad, np.int32) for pad in (self.max_batch, 0, self.prefix_index.capacity))
        slots[:len(saves)], starts[:len(saves)], blocks[:len(saves)] = zip(*saves)
        self._pool = self._save(self._cache, self._pool, jnp.asarray(slots), jnp.asarray(starts), jnp.asarray(blocks))

    def _start_decoding(self, logits: jax.Array, finished: list[tuple[int, int]]) -> None:
        """Sample the first token of each slot whose prompt is in, and hand it over.

        ``finished``: (logits row, slot) pairs; a follower shares its leader's row and first
        copies the leader's cache row.
        """
        followers = [(self._slots[index].leader, index) for _, index in finished if self._slots[index].leader]
        if followers:
            count = _power_of_two_at_least(len(followers), 1)
            sources, targets = np.zeros(count, np.int32), np.full(count, self.max_batch, np.int32)
            for row, (leader, index) in enumerate(followers):
                sources[row], targets[row] = self._slots.index(leader), index
                self._slots[index].leader = None
                self._record_cached(index, self._slots[index].handle.prompt.size)
            self._cache = self._copy_rows(self._cache, jnp.asarray(sources), jnp.asarray(targets))
        size = _power_of_two_at_least(len(finished), 1)
        logits_rows, slots = np.zeros(size, np.int32), np.full(size, self.max_batch - 1, np.int32)
        for row, (logits_row, index) in enumerate(finished):
            logits_rows[row], slots[row] = logits_row, index
        wants_logprobs = any(self._slots[index].handle.params.logprobs for _, index in finished)
        live = np.arange(size) < len(finished)
        steerings = [self._steering[index] for _, index in finished] + [None] * (size - len(finished))
        masks = constraints.step_masks(steerings, self.model.config.vocab_size)
        tokens, logprobs = jax.device_get(self._first_tokens(jnp.take(logits, jnp.asarray(logits_rows), axis=0),
                                                             self._sampling(slots, live),
                                                             jax.tree.map(jnp.asarray, masks),
                                                             logprobs=wants_logprobs))
        if logprobs is not None:  # one step per row, as a burst's are laid out
            logprobs = programs.TokenLogprobs(*(np.expand_dims(part, 1) for part in logprobs))
        now = time.perf_counter()
        for row, (_, index) in enumerate(finished):
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
        under_one_mask = constraints.burst_steps(steerings, steps)
        by_token = under_one_mask < steps and jax.process_count() == 1
        if not by_token:
            steps = under_one_mask
        masks = constraints.step_masks(steerings, self.model.config.vocab_size,
                                       [row for row, steering in enumerate(steerings) if steering] if by_token else None)
        rows = programs.Rows(*(np.where(live.reshape(-1, *[1] * (field.ndim - 1)), field[taken], 0).astype(field.dtype)
                               for field in self._rows))
        pauses = constraints.pause_tokens(steerings) if not by_token else np.full(size, -1, np.int32)
        rows.stop_tokens[:, -1] = pauses
        wants_logprobs = any(self._slots[index].handle.params.logprobs for index in decoding)
        self._burst_steerings, self._burst_masks = steerings, masks
        self._burst_accepted = np.zeros(size, np.int32)
        burst, seconds = self._decode(self._graphdef, self._state, self._cache, jnp.asarray(slots),
                                      jax.tree.map(jnp.asarray, rows), self._sampling(taken, live),
                                      jnp.int32(steps), jax.tree.map(jnp.asarray, masks),
                                      logprobs=wants_logprobs, next_masks=self._steer_step if by_token else None)
        self.compile_seconds += seconds
        self._cache = burst.cache
        new_rows, tokens, valid, logprobs = jax.device_get((burst.rows, burst.tokens, burst.valid, burst.logprobs))
        self._burst_steerings, self._burst_masks = [], None
        now = time.perf_counter()
        for field, new in zip(self._rows, new_rows):
            field[decoding] = new[:decoding.size]
        self._rows.stop_tokens[decoding, -1] = -1
        for row, index in enumerate(decoding):
            slot = self._slots[index]
            steps_valid = np.flatnonzero(valid[row])
            if self._steering[index] is not None:  # the tokens its callbacks have not handed it
                for token in tokens[row, steps_valid[self._burst_accepted[row]:]].tolist():
                    self._steering[index].accept(token)
            self._hand_over(index, tokens[row, steps_valid].tolist(), logprobs, row, steps_valid, now)
            if not self._rows.active[index]:
                last = int(tokens[row, steps_valid[-1]])
                stopped = last in slot.handle.params.stop_token_ids
                if last == pauses[row] and not stopped and self._rows.generated[index] < self._rows.max_tokens[index]:
                    self._rows.active[index] = True  # paused where its grammar's free text ended: steered again
                else:
                    self._release(index, "stop" if stopped else "length")

    def _steer_step(self, handed: jax.Array) -> np.ndarray:
        """The host's turn within a burst steered token by token (``next_masks`` of
        :func:`programs.decode_burst`), while the device may run the step's forward pass: the
        tokens of the step before to the steered rows that made one, then the bits of the step's
        masks for the steered rows (at step 0, the burst's first masks).

        ``handed``: int32 ``[1 + 2 * rows]``: the step, each row's token, whether it made one.
        """
        handed = np.asarray(handed)
        rows = (handed.size - 1) // 2
        step, tokens, made = handed[0], handed[1:1 + rows], handed[1 + rows:]
        if step == 0:
            return self._burst_masks.bits
        steerings = self._burst_steerings
        steered = [row for row, steering in enumerate(steerings) if steering is not None]
        for row in steered:
            if made[row]:
                steerings[row].accept(int(tokens[row]))
                self._burst_accepted[row] += 1
        return constraints.step_masks(steerings, self.model.config.vocab_size, steered).bits

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
