"""``POST /v1/responses``: output items (``reasoning``, ``message``, ``function_call``), whole or as events.

The items are built from the reply's events as they come, so the streamed events and the final
response say the same thing. A stored response's conversation (its input and output, as Harmony
messages) lets a later request continue it with ``previous_response_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptoss_jax.engine import SamplingParams
from gptoss_jax.harmony import Message, Role, stop_token_ids
from gptoss_jax.serving.generation import token_stream
from gptoss_jax.serving.protocol import ResponsesRequest
from gptoss_jax.serving.state import ServerState, StoredResponse
from gptoss_jax.serving.streaming import sse, until_done_or_disconnected
from gptoss_jax.serving.structured import answer_grammar, reply_constraint, tool_grammars
from gptoss_jax.serving.translate import (
    ReplyEvent, ReplyParser, TranslationError, build_prompt, tool_choice_of, function_tools, response_items,
)

Emit = Callable[[str, dict[str, Any]], None]


class OutputItems:
    """Reply events -> Responses output items, with the streaming events of each step if ``emit``."""

    def __init__(self, emit: Emit | None):
        self.items: list[dict[str, Any]] = []
        self._emit = emit or (lambda kind, payload: None)
        self._text: list[str] = []  # of the open item

    def _open(self, item: dict[str, Any]) -> None:
        self.close()
        self.items.append(item)
        self._emit("response.output_item.added", dict(output_index=len(self.items) - 1, item=item))
        if item["type"] in ("message", "reasoning"):
            part = dict(type="output_text", text="", annotations=[]) if item["type"] == "message" else \
                dict(type="reasoning_text", text="")
            if item["type"] == "message":
                self._emit("response.content_part.added", dict(self._where(), part=part))

    def _where(self) -> dict[str, Any]:
        return dict(item_id=self.items[-1]["id"], output_index=len(self.items) - 1, content_index=0)

    def feed(self, event: ReplyEvent) -> None:
        kinds = {"reasoning": "reasoning", "content": "message"}
        if event.kind in kinds:
            kind = kinds[event.kind]
            if not self.items or self.items[-1]["type"] != kind or self.items[-1]["status"] != "in_progress":
                prefix = "rs" if kind == "reasoning" else "msg"
                item = dict(id=f"{prefix}_{uuid.uuid4().hex}", type=kind, status="in_progress")
                item.update(dict(summary=[], content=[]) if kind == "reasoning" else dict(role="assistant", content=[]))
                self._open(item)
            self._text.append(event.text)
            name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            extra = {} if kind == "reasoning" else dict(logprobs=[])
            self._emit(name, dict(self._where(), delta=event.text, **extra))
        elif event.kind == "tool_call":
            self._open(dict(id=f"fc_{uuid.uuid4().hex}", type="function_call", status="in_progress",
                            call_id=event.call.call_id, name=event.call.name, arguments=""))
        else:
            self._text.append(event.text)
            self._emit("response.function_call_arguments.delta",
                       dict(item_id=self.items[-1]["id"], output_index=len(self.items) - 1, delta=event.text))

    def close(self) -> None:
        """Finish the open item, if any."""
        if not self.items or self.items[-1]["status"] != "in_progress":
            return
        item, text, where = self.items[-1], "".join(self._text), self._where()
        self._text = []
        item["status"] = "completed"
        if item["type"] == "message":
            part = dict(type="output_text", text=text, annotations=[], logprobs=[])
            item["content"] = [part]
            self._emit("response.output_text.done", dict(where, text=text, logprobs=[]))
            self._emit("response.content_part.done", dict(where, part=part))
        elif item["type"] == "reasoning":
            item["content"] = [dict(type="reasoning_text", text=text)]
            self._emit("response.reasoning_text.done", dict(where, text=text))
        else:
            item["arguments"] = text
            self._emit("response.function_call_arguments.done",
                       dict(item_id=item["id"], output_index=where["output_index"], arguments=text))
        self._emit("response.output_item.done", dict(output_index=where["output_index"], item=item))

    def as_messages(self, call_names: dict[str, str]) -> list[Message]:
        """The output as Harmony messages, for the response store; its calls are added to ``call_names``."""
        messages = []
        for item in self.items:
            if item["type"] == "reasoning":
                messages.append(Message(Role.ASSISTANT, item["content"][0]["text"], channel="analysis"))
            elif item["type"] == "message":
                messages.append(Message(Role.ASSISTANT, item["content"][0]["text"], channel="final"))
            else:
                messages += response_items([dict(type="function_call", call_id=item["call_id"], name=item["name"],
                                                 arguments=item["arguments"])], call_names)
        return messages


async def respond(state: ServerState, body: ResponsesRequest, request: Request) -> Response:
    instructions = body.instructions
    history: list[Message] = []
    call_names: dict[str, str] = {}
    if body.previous_response_id is not None:
        stored = state.stored_response(body.previous_response_id)
        if stored is None:
            raise TranslationError(f"previous_response_id: no stored response {body.previous_response_id!r}")
        history, call_names = stored.messages, dict(stored.call_names)
        instructions = instructions if instructions is not None else stored.instructions
    input_messages = history + response_items(body.input, call_names)
    effort = body.reasoning.effort if body.reasoning is not None else None
    tool_choice = tool_choice_of(body.tool_choice, nested=False)
    prompt = build_prompt(input_messages, state.tokenizer, instructions=instructions,
                          tools=function_tools(body.tools, nested=False), tool_choice=tool_choice,
                          reasoning_effort=effort)
    text_format = (body.text or {}).get("format")
    grammar = reply_constraint(answer_grammar(text_format, "text.format", nested=False, tokenizer=state.tokenizer),
                               tool_grammars(body.tools, nested=False, tokenizer=state.tokenizer), tool_choice)
    handle = state.engine.submit(prompt.token_ids, SamplingParams(
        max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        stop_token_ids=tuple(stop_token_ids(state.tokenizer)), grammar=grammar, harmony_frame=False,
        thinking_token_budget=body.thinking_token_budget))
    response_id = f"resp_{uuid.uuid4().hex}"
    created = int(time.time())

    def response_object(status: str, items: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        return dict(
            id=response_id, object="response", created_at=created, status=status, model=state.model_name,
            output=items, instructions=instructions, error=None, incomplete_details=None, metadata={},
            parallel_tool_calls=True, temperature=body.temperature, top_p=body.top_p,
            tool_choice=body.tool_choice or "auto", tools=body.tools or [],
            previous_response_id=body.previous_response_id, store=body.store,
            reasoning=dict(effort=effort, summary=None), text=dict(format=text_format or dict(type="text")),
            truncation="disabled",
            usage=usage,
        )

    async def run(output: OutputItems) -> dict[str, Any]:
        parser = ReplyParser(state.tokenizer, prompt.forced)
        async with contextlib.aclosing(token_stream(handle)) as tokens:
            async for token, _ in tokens:
                for event in parser.feed(token):
                    output.feed(event)
        for event in parser.close():
            output.feed(event)
        parser.finish()
        output.close()
        result = handle.result()
        state.metrics.record(result)
        if body.store:
            state.store_response(response_id, StoredResponse(input_messages + output.as_messages(call_names),
                                                             instructions, call_names))
        usage = dict(input_tokens=len(prompt.token_ids), input_tokens_details=dict(cached_tokens=result.cached_tokens),
                     output_tokens=result.completion_tokens, output_tokens_details=dict(reasoning_tokens=0),
                     total_tokens=len(prompt.token_ids) + result.completion_tokens)
        status = "incomplete" if result.finish_reason == "length" else "completed"
        finished = response_object(status, output.items, usage)
        if status == "incomplete":
            finished["incomplete_details"] = dict(reason="max_output_tokens")
        return finished

    if not body.stream:
        return JSONResponse(await until_done_or_disconnected(request, run(OutputItems(None))))

    async def events():
        queue: asyncio.Queue = asyncio.Queue()
        sequence = iter(range(1 << 62))

        def emit(kind: str, payload: dict[str, Any]) -> None:
            queue.put_nowait(dict(type=kind, sequence_number=next(sequence), **payload))

        emit("response.created", dict(response=response_object("in_progress", [], None)))
        emit("response.in_progress", dict(response=response_object("in_progress", [], None)))
        task = asyncio.create_task(run(OutputItems(emit)))
        try:
            while not (task.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    event = getter.result()
                    yield f"event: {event['type']}\n" + sse(event)
                else:
                    getter.cancel()
            finished = task.result()
        except Exception as error:  # the engine stopped: say so in the stream, as OpenAI's "error" event
            yield "event: error\n" + sse(dict(type="error", sequence_number=next(sequence), message=str(error),
                                              code="server_error", param=None))
            return
        finally:
            task.cancel()
        kind = "response.completed" if finished["status"] == "completed" else "response.incomplete"
        yield f"event: {kind}\n" + sse(dict(type=kind, sequence_number=next(sequence), response=finished))

    return StreamingResponse(events(), media_type="text/event-stream")
