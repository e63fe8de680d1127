"""What every endpoint does with the engine: submit, follow the tokens, stop on text, cancel.

``token_stream`` follows one request's tokens on the event loop; closing it early (a stop
string matched, or the client went away) cancels the request.
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import AsyncIterator, Sequence

from gptoss_jax.engine import Engine, RequestError, RequestHandle, RequestResult, SamplingParams, TokenLogprob
from gptoss_jax.tokenizer import Tokenizer


class StopText:
    """Matches stop strings on text that arrives in pieces (across token boundaries).

    :meth:`push` returns the text that is safe to show: a tail that could begin a stop string is
    held back until the next piece settles it.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [stop for stop in stops if stop]
        self.hit = False
        self._pending = ""

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        buffer = self._pending + text
        found = [index for index in (buffer.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.hit, self._pending = True, ""
            return buffer[:min(found)]
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if buffer.endswith(stop[:k])), default=0)
        self._pending = buffer[len(buffer) - hold:]
        return buffer[:len(buffer) - hold]

    def flush(self) -> str:
        """The held-back tail, once no more text comes."""
        text, self._pending = self._pending, ""
        return "" if self.hit else text


class Detokenizer:
    """Token ids -> text, incrementally: a character split over tokens appears once it is whole."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def normalized_stops(stop: str | Sequence[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if len(stops) > 4:
        raise RequestError("stop: at most 4 stop strings")
    return stops


async def token_stream(handle: RequestHandle) -> AsyncIterator[tuple[int, TokenLogprob | None]]:
    """``handle``'s tokens (with their log-probabilities, if asked) as they come.

    Closing the stream early (a stop string matched, the client went away) cancels the request.
    Use it under ``contextlib.aclosing`` so that the cancel happens at once.
    """
    try:
        async for delta in handle:
            for position, token in enumerate(delta.tokens):
                yield token, delta.logprobs[position] if delta.logprobs is not None else None
    finally:
        if not handle.done:
            handle.cancel()


def submit_choices(engine: Engine, prompt: Sequence[int], n: int, params: SamplingParams) -> list[RequestHandle]:
    """``n`` requests of one prompt; choice i samples with seed + i, so n > 1 gives different samples."""
    handles = []
    try:
        for index in range(n):
            seed = None if params.seed is None else params.seed + index
            handles.append(engine.submit(prompt, dataclasses.replace(params, seed=seed)))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


def prompt_cached_tokens(choices: Sequence[RequestResult]) -> int:
    """The ``cached_tokens`` of one prompt's ``n`` choices: what the first to compute it took from the cache.

    The other choices copy the whole prompt from it, so the fewest cached tokens among them is
    what the prompt cost (0 without choices: a stream's header).
    """
    return min((result.cached_tokens for result in choices), default=0)
