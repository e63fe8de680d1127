"""``POST /v1/completions``: raw text (or token id) prompts continued as they are, no Harmony.

``echo`` with ``logprobs`` returns the prompt's own tokens with their log-probabilities, the
interface evaluation harnesses use for log-likelihood scoring: one forward pass of the prompt
that keeps every position's logits, beside the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from flax import nnx

from gptoss_jax.engine import RequestError, RequestHandle, RequestResult, SamplingParams, TokenLogprob
from gptoss_jax.model import GptOss
from gptoss_jax.serving.generation import (
    Detokenizer, StopText, normalized_stops, prompt_cached_tokens, submit_choices, token_stream,
)
from gptoss_jax.serving.protocol import CompletionRequest
from gptoss_jax.serving.state import ServerState
from gptoss_jax.serving.streaming import merged_stream, sse, until_done_or_disconnected
from gptoss_jax.tokenizer import Tokenizer

COMPLETION_STOP_TOKENS = ("<|endoftext|>", "<|return|>")
_MIN_ECHO_BUCKET = 16


@nnx.jit
def _log_probabilities(model: GptOss, tokens: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(model(tokens), axis=-1)


def prompt_logprobs(model: GptOss, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it (None for the first)."""
    length = max(_MIN_ECHO_BUCKET, 1 << (len(ids) - 1).bit_length())  # bucketed: one program per bucket
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(ids)] = ids  # padding comes after: causal attention keeps it from every real position
    log_probabilities = np.asarray(_log_probabilities(model, jnp.asarray(tokens)))[0]
    entries: list[TokenLogprob | None] = [None]
    for position in range(1, len(ids)):
        row = log_probabilities[position - 1]
        best = np.argsort(-row)[:top]
        entries.append(TokenLogprob(ids[position], float(row[ids[position]]),
                                    tuple((int(token), float(row[token])) for token in best)))
    return entries


def _prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [state.tokenizer.encode(prompt, allowed_special="all")]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    if prompt and all(isinstance(item, str) for item in prompt):
        return [state.tokenizer.encode(item, allowed_special="all") for item in prompt]
    if prompt and all(isinstance(item, list) for item in prompt):
        return [list(item) for item in prompt]
    raise RequestError("prompt: expected text, token ids, or a list of either")


def _logprobs_object(tokenizer: Tokenizer, entries: list[TokenLogprob | None], texts: list[str],
                     offset: int) -> dict[str, Any]:
    """OpenAI's legacy completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    decode = lambda token: tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")  # noqa: E731
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return dict(
        tokens=texts,
        token_logprobs=[None if entry is None else entry.logprob for entry in entries],
        top_logprobs=[None if entry is None else {decode(token): lp for token, lp in entry.top} for entry in entries],
        text_offset=offsets,
    )


class CompletionChoice:
    def __init__(self, index: int, handle: RequestHandle, state: ServerState, prompt: list[int], echo: bool,
                 top: int | None, stops: list[str], emit):
        self.index, self.handle, self.state, self.prompt = index, handle, state, prompt
        self.echo, self.top, self.emit = echo, top, emit
        self.detokenizer, self.stop_text = Detokenizer(state.tokenizer), StopText(stops)

    async def run(self) -> dict[str, Any]:
        tokenizer = self.state.tokenizer
        texts, entries, tokens_text = [], [], []
        prefix = ""
        if self.echo:
            prefix = tokenizer.decode(self.prompt)
            if self.top is not None:
                entries += await asyncio.to_thread(prompt_logprobs, self.state.engine.model, self.prompt, self.top)
                tokens_text += [tokenizer.decode_bytes([t]).decode("utf-8", errors="replace") for t in self.prompt]
            if self.emit is not None:
                self.emit(dict(index=self.index, text=prefix, logprobs=None, finish_reason=None))
        async with contextlib.aclosing(token_stream(self.handle)) as stream:
            async for token, logprob in stream:
                piece = self.stop_text.push(self.detokenizer.push(token))
                if logprob is not None:
                    entries.append(logprob)
                    tokens_text.append(tokenizer.decode_bytes([token]).decode("utf-8", errors="replace"))
                if piece:
                    texts.append(piece)
                    if self.emit is not None:
                        self.emit(dict(index=self.index, text=piece, logprobs=None, finish_reason=None))
                if self.stop_text.hit:
                    break
        result = self.handle.result()
        tail = self.stop_text.push(self.detokenizer.flush()) + self.stop_text.flush()
        texts.append(tail)
        finish_reason = "stop" if self.stop_text.hit or result.finish_reason == "stop" else "length"
        if self.emit is not None:
            self.emit(dict(index=self.index, text=tail, logprobs=None, finish_reason=finish_reason))
        logprobs = None if self.top is None else _logprobs_object(tokenizer, entries, tokens_text, 0)
        return dict(index=self.index, text=prefix + "".join(texts), logprobs=logprobs, finish_reason=finish_reason,
                    completion_tokens=result.completion_tokens, result=result)


async def complete(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    prompts = _prompts(state, body.prompt)
    special = state.tokenizer.special_tokens
    params = SamplingParams(
        max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        stop_token_ids=tuple(special[name] for name in COMPLETION_STOP_TOKENS if name in special),
        logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0,
    )
    stops = normalized_stops(body.stop)
    chunks: asyncio.Queue | None = asyncio.Queue() if body.stream else None
    choices = []
    for prompt_index, prompt in enumerate(prompts):
        for offset, handle in enumerate(submit_choices(state.engine, prompt, body.n, params)):
            choices.append(CompletionChoice(prompt_index * body.n + offset, handle, state, prompt, body.echo,
                                            body.logprobs, stops, None if chunks is None else chunks.put_nowait))
    prompt_tokens = sum(len(prompt) for prompt in prompts)
    identity = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()),
                    model=state.model_name)

    def finished(results: list[dict[str, Any]]) -> dict[str, Any]:
        completion_tokens = sum(result.pop("completion_tokens") for result in results)
        by_prompt: list[list[RequestResult]] = [[] for _ in prompts]
        for result in results:
            by_prompt[result["index"] // body.n].append(result["result"])
            state.metrics.record(result.pop("result"))
        return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens,
                    prompt_tokens_details=dict(cached_tokens=sum(map(prompt_cached_tokens, by_prompt))))

    if chunks is None:
        results = list(await until_done_or_disconnected(request, asyncio.gather(*(c.run() for c in choices))))
        usage = finished(results)
        return JSONResponse(dict(identity, choices=results, usage=usage))

    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events():
        async for event in merged_stream([choice.run for choice in choices], chunks,
                                         lambda chunk: sse(dict(identity, choices=[chunk]))):
            yield event
        if not chunks.empty():
            usage = finished(chunks.get_nowait())
            if include_usage:
                yield sse(dict(identity, choices=[], usage=usage))
            yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
