"""``POST /v1/chat/completions``: Harmony replies as OpenAI chat completions, whole or streamed."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from gptoss_jax.engine import RequestHandle, SamplingParams, TokenLogprob
from gptoss_jax.harmony import stop_token_ids
from gptoss_jax.serving.generation import (
    StopText, normalized_stops, prompt_cached_tokens, submit_choices, token_stream,
)
from gptoss_jax.serving.protocol import ChatCompletionRequest
from gptoss_jax.serving.state import ServerState
from gptoss_jax.serving.structured import answer_grammar, reply_constraint, tool_grammars
from gptoss_jax.serving.translate import (
    ReplyEvent, ReplyParser, build_prompt, chat_messages, function_tools, tool_choice_of,
)
from gptoss_jax.tokenizer import Tokenizer

Emit = Callable[[dict[str, Any]], None]


def token_logprob_entry(tokenizer: Tokenizer, entry: TokenLogprob) -> dict[str, Any]:
    """One token of a chat choice's ``logprobs.content``."""
    def described(token: int, logprob: float) -> dict[str, Any]:
        raw = tokenizer.decode_bytes([token])
        return dict(token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw))

    return dict(described(entry.token, entry.logprob),
                top_logprobs=[described(token, logprob) for token, logprob in entry.top])


class ChatChoice:
    """One choice: follows its request's tokens and builds the message (and, streaming, the deltas)."""

    def __init__(self, index: int, handle: RequestHandle, tokenizer: Tokenizer, forced: list[int],
                 stops: list[str], emit: Emit | None):
        self.index, self.handle, self.tokenizer = index, handle, tokenizer
        self.parser = ReplyParser(tokenizer, forced)
        self.stop_text = StopText(stops)
        self.emit = emit
        self.content: list[str] = []
        self.logprobs: list[dict[str, Any]] = []

    def _delta(self, **delta: Any) -> None:
        if self.emit is not None:
            self.emit(dict(index=self.index, delta=delta, logprobs=None, finish_reason=None))

    def _on_token(self, token: int, logprob: TokenLogprob | None) -> bool:
        """Route one token; True when a stop string ended the reply."""
        self._route(self.parser.feed(token), logprob)
        return self.stop_text.hit

    def _route(self, events: list[ReplyEvent], logprob: TokenLogprob | None) -> None:
        for event in events:
            if event.kind == "reasoning":
                self._delta(reasoning_content=event.text)
            elif event.kind == "content":
                text = self.stop_text.push(event.text)
                if logprob is not None:
                    self.logprobs.append(token_logprob_entry(self.tokenizer, logprob))
                if text:
                    self.content.append(text)
                    self._delta(content=text)
            elif event.kind == "tool_call":
                self._delta(tool_calls=[dict(index=event.index, id=event.call.call_id, type="function",
                                             function=dict(name=event.call.name, arguments=""))])
            else:
                self._delta(tool_calls=[dict(index=event.index, function=dict(arguments=event.text))])

    async def run(self) -> dict[str, Any]:
        """Follow the request to its end; returns the choice as the whole response holds it."""
        self._delta(role="assistant", content="")
        async with contextlib.aclosing(token_stream(self.handle)) as tokens:
            async for token, logprob in tokens:
                if self._on_token(token, logprob):
                    break
        result = self.handle.result()
        if not self.stop_text.hit:
            self._route(self.parser.close(), None)
        tail = self.stop_text.flush()
        if tail:
            self.content.append(tail)
            self._delta(content=tail)
        reply = self.parser.finish()
        if reply.tool_calls and reply.stopped_for_call:
            finish_reason = "tool_calls"
        elif self.stop_text.hit or result.finish_reason == "stop":
            finish_reason = "stop"
        else:
            finish_reason = "length"
        if self.emit is not None:
            self.emit(dict(index=self.index, delta={}, logprobs=None, finish_reason=finish_reason))
        message: dict[str, Any] = dict(role="assistant", content="".join(self.content) or None,
                                       reasoning_content=reply.reasoning or None)
        if reply.tool_calls:
            message["tool_calls"] = [dict(id=call.call_id, type="function",
                                          function=dict(name=call.name, arguments=call.arguments))
                                     for call in reply.tool_calls]
        logprobs = dict(content=self.logprobs) if self.handle.params.logprobs else None
        return dict(index=self.index, message=message, logprobs=logprobs, finish_reason=finish_reason,
                    completion_tokens=result.completion_tokens, result=result)


def prepare(state: ServerState, body: ChatCompletionRequest, emit: Emit | None) -> tuple[list[ChatChoice], int]:
    """Translate the request and submit its choices; returns them and the prompt's token count."""
    instructions, messages = chat_messages([message.model_dump() for message in body.messages])
    tool_choice = tool_choice_of(body.tool_choice, nested=True)
    prompt = build_prompt(messages, state.tokenizer, instructions=instructions,
                          tools=function_tools(body.tools, nested=True), tool_choice=tool_choice,
                          reasoning_effort=body.reasoning_effort)
    grammar = reply_constraint(answer_grammar(body.response_format, "response_format", nested=True,
                                              tokenizer=state.tokenizer),
                               tool_grammars(body.tools, nested=True, tokenizer=state.tokenizer), tool_choice)
    stops = normalized_stops(body.stop)
    params = SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature, top_p=body.top_p,
        seed=body.seed, stop_token_ids=tuple(stop_token_ids(state.tokenizer)), logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0, grammar=grammar, harmony_frame=False,
        thinking_token_budget=body.thinking_token_budget,
    )
    handles = submit_choices(state.engine, prompt.token_ids, body.n, params)
    choices = [ChatChoice(index, handle, state.tokenizer, prompt.forced, stops, emit)
               for index, handle in enumerate(handles)]
    return choices, len(prompt.token_ids)


def completion_object(state: ServerState, choices: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
    completion_tokens = sum(choice.pop("completion_tokens") for choice in choices)
    results = [choice.pop("result") for choice in choices]
    for result in results:
        state.metrics.record(result)
    return dict(id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion", created=int(time.time()),
                model=state.model_name, choices=choices,
                usage=dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens,
                           prompt_tokens_details=dict(cached_tokens=prompt_cached_tokens(results))))
