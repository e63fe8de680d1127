"""What a request to the engine carries in, and the handle that carries its tokens out.

A :class:`RequestHandle` is filled by the engine's thread and read from any thread or from
asyncio: iterate it (``for delta in handle`` or ``async for delta in handle``) for the tokens as
they are made, or wait for :meth:`RequestHandle.result`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from gptoss_jax.errors import GptOssError

MAX_STOP_TOKENS = 16
"""Stop token ids one request may give (the engine's per-row stop table is this wide)."""

MAX_TOP_LOGPROBS = 20
"""The most alternatives per token a request may ask for (OpenAI's API allows 20)."""

FinishReason = Literal["stop", "length", "cancelled"]


class RequestError(GptOssError):
    """A request the engine refuses at submit: the message names the setting and its bounds."""


class QueueFullError(RuntimeError):
    """The engine's queue of waiting requests is full; try again later (HTTP 429)."""


class EngineClosedError(RuntimeError):
    """The engine stopped (closed, or failed) before the request finished."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """A request's settings (OpenAI's names where it has them).

    Attributes:
      max_tokens: the most tokens to generate (None: up to the engine's context).
      temperature: 0 is greedy.
      top_p: keep the most likely tokens holding this probability (1: all).
      top_k: keep the k most likely tokens (None: all).
      seed: the request's own random stream: the same prompt, settings and seed give the same
        tokens, whatever else the engine runs. None draws one.
      stop_token_ids: the request ends after producing one of these (it is kept in the output).
      logprobs: return each token's log-probability.
      top_logprobs: and this many most likely alternatives per token (needs ``logprobs``).
      json_schema: the answer must be JSON valid against this schema (a dict, or True for any
        JSON value); enforced while decoding (needs the ``structured`` extra and an engine made
        with ``tokenizer=``).
      regex: the answer must match this regular expression.
      grammar: the answer must follow this grammar (llguidance's Lark dialect). At most one of
        ``json_schema``, ``regex`` and ``grammar``.
      harmony_frame: the prompt ends with ``<|start|>assistant`` and the constraint covers the
        final channel's message, the rest of the reply following Harmony's frame (free
        analysis first). False: the constraint covers the whole output (a raw prompt, or a
        grammar that spells Harmony's frame itself).
      thinking_token_budget: tokens the reply may write before its final channel opens; then
        the engine ends what is open and opens it, as forced tokens that count toward
        ``max_tokens``. None: no cap. For Harmony prompts (ending with ``<|start|>assistant``).
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    json_schema: Mapping[str, Any] | bool | None = None
    regex: str | None = None
    grammar: str | None = None
    harmony_frame: bool = True
    thinking_token_budget: int | None = None

    @property
    def constrained(self) -> bool:
        """Whether decoding is constrained (json_schema, regex or grammar)."""
        return (self.json_schema, self.regex, self.grammar) != (None, None, None)

    def checked(self, prompt_length: int, max_context: int, vocab_size: int) -> SamplingParams:
        """These settings with defaults resolved, or a :class:`RequestError` saying what is wrong."""
        room = max_context - prompt_length
        max_tokens = room if self.max_tokens is None else self.max_tokens
        if not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if max_tokens > room:
            raise RequestError(f"the prompt ({prompt_length} tokens) plus max_tokens ({max_tokens}) exceeds the "
                               f"engine's context of {max_context} tokens")
        if not 0 <= self.temperature <= 1e4:  # also refuses NaN
            raise RequestError(f"temperature must be from 0 to 10000, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer))
                                       or self.top_k < 1):
            raise RequestError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        seed = self.seed if self.seed is not None else int(np.random.default_rng().integers(2**31))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
            raise RequestError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        stops = tuple(int(token) for token in self.stop_token_ids)
        if len(stops) > MAX_STOP_TOKENS:
            raise RequestError(f"at most {MAX_STOP_TOKENS} stop token ids, got {len(stops)}")
        if any(not 0 <= token < vocab_size for token in stops):
            raise RequestError(f"stop token ids must be in the vocabulary [0, {vocab_size})")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=True")
        if sum(value is not None for value in (self.json_schema, self.regex, self.grammar)) > 1:
            raise RequestError("give at most one of json_schema, regex and grammar")
        if self.json_schema is not None and not isinstance(self.json_schema, (Mapping, bool)):
            raise RequestError(f"json_schema must be an object (a dict) or a boolean, got "
                               f"{type(self.json_schema).__name__}")
        budget = self.thinking_token_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0):
            raise RequestError(f"thinking_token_budget must be an integer >= 0 or None, got {budget!r}")
        return dataclasses.replace(self, max_tokens=int(max_tokens), seed=int(seed), stop_token_ids=stops)


def checked_prompt(prompt, vocab_size: int, max_context: int) -> np.ndarray:
    """A prompt of token ids as int32 ``[tokens]``, or a :class:`RequestError` saying what is wrong with it."""
    if isinstance(prompt, (str, bytes)):
        raise RequestError("the prompt must be token ids, not text: encode it with the tokenizer first")
    ids = np.asarray(prompt)
    if ids.ndim != 1:
        raise RequestError(f"the prompt must be a flat sequence of token ids, got shape {ids.shape}")
    if ids.size == 0:
        raise RequestError("the prompt is empty: generation needs at least one token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise RequestError(f"the prompt must hold integer token ids, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise RequestError(f"the prompt has token ids outside the vocabulary [0, {vocab_size})")
    if ids.size + 1 > max_context:
        raise RequestError(f"the prompt ({ids.size} tokens) leaves no room for a token in the engine's context "
                           f"of {max_context}")
    return ids.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability (untempered) and the most likely alternatives at its step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Delta:
    """Tokens a request got at one engine step (a decode burst hands over several at once)."""

    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    time: float  # time.perf_counter() when the engine handed them over


@dataclasses.dataclass(frozen=True)
class RequestResult:
    """A finished request.

    Attributes:
      tokens: every generated token id (a stop token, when hit, is the last one).
      logprobs: per token, when the request asked for them.
      finish_reason: ``stop`` (a stop token), ``length`` (max_tokens or the context) or
        ``cancelled``.
      prompt_tokens, completion_tokens: token counts.
      cached_tokens: prompt tokens taken from the prefix cache (or copied from a request
        prefilling the same prompt) rather than computed.
      time_to_first_token: seconds from submit to the first token (None if none came).
      token_times: ``time.perf_counter()`` of each token's hand-over.
    """

    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    time_to_first_token: float | None
    token_times: list[float]


class RequestHandle:
    """One submitted request: stream its tokens, wait for its result, or cancel it.

    Thread-safe; the engine's thread writes it, any thread or event loop reads it.
    """

    def __init__(self, request_id: int, prompt: np.ndarray, params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.submitted = time.perf_counter()
        self.cached_tokens = 0
        """Prompt tokens not computed (set by the engine at admission)."""
        self._condition = threading.Condition()
        self._deltas: list[Delta] = []
        self._finish_reason: FinishReason | None = None
        self._error: BaseException | None = None
        self._cancel_requested = False
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    # --- read side -----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        with self._condition:
            return self._finish_reason is not None or self._error is not None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def cancel(self) -> None:
        """Stop the request; its slot is free at the engine's next step. Finished ones are left as they are."""
        with self._condition:
            self._cancel_requested = True
        self._engine_wake()

    def __iter__(self) -> Iterator[Delta]:
        """Each :class:`Delta` as it comes, until the request finishes (raises if the engine stopped)."""
        seen = 0
        while True:
            with self._condition:
                self._condition.wait_for(lambda: len(self._deltas) > seen or self._over())
                deltas, over = self._deltas[seen:], self._over()
            seen += len(deltas)
            yield from deltas
            if over and seen == len(self._deltas):
                self._raise_error()
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        """The same as iterating, without blocking the event loop."""
        seen = 0
        loop = asyncio.get_running_loop()
        while True:
            with self._condition:
                deltas, over = self._deltas[seen:], self._over()
                if not deltas and not over:
                    waiter = loop.create_future()
                    self._async_waiters.append((loop, waiter))
            if not deltas and not over:
                await waiter
                continue
            seen += len(deltas)
            for delta in deltas:
                yield delta
            if over and seen == len(self._deltas):
                self._raise_error()
                return

    def result(self, timeout: float | None = None) -> RequestResult:
        """Wait for the request to finish (raises TimeoutError after ``timeout`` seconds)."""
        with self._condition:
            if not self._condition.wait_for(self._over, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self._result()

    async def result_async(self) -> RequestResult:
        """:meth:`result` for asyncio."""
        async for _ in self:
            pass
        return self._result()

    # --- write side (the engine) ---------------------------------------------------------------

    def _engine_wake(self) -> None:
        """Replaced by the engine that admits the request: wakes its thread."""

    def _push(self, delta: Delta) -> None:
        with self._condition:
            self._deltas.append(delta)
            self._notify()

    def _finish(self, reason: FinishReason) -> None:
        with self._condition:
            if not self._over():
                self._finish_reason = reason
            self._notify()

    def _fail(self, error: BaseException) -> None:
        with self._condition:
            if not self._over():
                self._error = error
            self._notify()

    # --- internals ------------------------------------------------------------------------------

    def _over(self) -> bool:
        return self._finish_reason is not None or self._error is not None

    def _notify(self) -> None:
        # Called with the condition held.
        self._condition.notify_all()
        for loop, waiter in self._async_waiters:
            loop.call_soon_threadsafe(_set_if_pending, waiter)
        self._async_waiters.clear()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _result(self) -> RequestResult:
        self._raise_error()
        tokens = [token for delta in self._deltas for token in delta.tokens]
        times = [delta.time for delta in self._deltas for _ in delta.tokens]
        logprobs = ([entry for delta in self._deltas for entry in delta.logprobs] if self.params.logprobs else None)
        return RequestResult(
            tokens=tokens, logprobs=logprobs, finish_reason=self._finish_reason, prompt_tokens=int(self.prompt.size),
            completion_tokens=len(tokens), cached_tokens=self.cached_tokens, time_to_first_token=times[0] - self.submitted if times else None,
            token_times=times,
        )


def _set_if_pending(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
