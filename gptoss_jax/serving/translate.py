"""OpenAI's chat and Responses shapes <-> Harmony messages and tokens (no HTTP here).

In: OpenAI messages (or Responses items) become a Harmony conversation. ``system`` and
``developer`` messages become the developer message's instructions, beside the function tools;
the Harmony system message carries the reasoning effort and the date, as OpenAI's own servers
do for gpt-oss. An assistant message's ``reasoning_content`` becomes its analysis message
(Harmony keeps it only where it still matters: between a tool call and its answer), its
``tool_calls`` commentary messages to ``functions.<name>``, and a ``tool`` message the tool's
answer, named after the call it answers.

Out: :class:`ReplyParser` reads the generated Harmony tokens as they come and says what each
adds: reasoning (the analysis channel), content (final, or commentary to no one), or a tool
call (commentary to ``functions.<name>``: its name once the header is read, then its arguments).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from gptoss_jax.errors import GptOssError
from gptoss_jax.harmony import (
    FUNCTIONS_NAMESPACE, DeveloperContent, Message, ReasoningEffort, Role, StreamParser, SystemContent,
    ToolDescription, drop_answered_analysis, encode_for_completion,
)
from gptoss_jax.tokenizer import Tokenizer

ToolChoice = Literal["auto", "none", "required"] | str  # or a function's name

logger = logging.getLogger(__name__)


class TranslationError(GptOssError):
    """Messages, items or tools that do not translate to Harmony; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A function call the model made: OpenAI's ``id``, ``function.name`` and ``function.arguments``."""

    call_id: str
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A turn's prompt: token ids up to and including what the server forces of the reply's header.

    ``forced`` is the tail of ``token_ids`` that belongs to the reply (a forced tool call's
    header); the parser reads it first.
    """

    token_ids: list[int]
    forced: list[int]


def _text_of(content: Any, field: str) -> str:
    """A message's content: a string, or a list of text parts (``text``, ``input_text``, ``output_text``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") not in ("text", "input_text", "output_text"):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise TranslationError(f"{field}: only text content parts are supported, got {kind!r}")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise TranslationError(f"{field}: content must be a string or a list of text parts")


def _tool_call_message(name: str, arguments: str) -> Message:
    return Message(Role.ASSISTANT, arguments, channel="commentary", recipient=f"{FUNCTIONS_NAMESPACE}.{name}",
                   content_type="<|constrain|>json")


def _tool_result_message(name: str, output: str) -> Message:
    return Message(Role.TOOL, output, name=f"{FUNCTIONS_NAMESPACE}.{name}", recipient="assistant",
                   channel="commentary")


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[Message]]:
    """OpenAI chat ``messages`` -> (developer instructions, Harmony messages after the system/developer ones)."""
    instructions: list[str] = []
    converted: list[Message] = []
    call_names: dict[str, str] = {}
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        role = message.get("role")
        if role in ("system", "developer"):
            instructions.append(_text_of(message.get("content"), f"{field}.content"))
        elif role == "user":
            converted.append(Message(Role.USER, _text_of(message.get("content"), f"{field}.content")))
        elif role == "assistant":
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if reasoning:
                converted.append(Message(Role.ASSISTANT, str(reasoning), channel="analysis"))
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                name = function.get("name")
                if not name:
                    raise TranslationError(f"{field}.tool_calls: a call needs function.name")
                call_names[str(call.get("id"))] = name
                converted.append(_tool_call_message(name, str(function.get("arguments") or "{}")))
            content = _text_of(message.get("content"), f"{field}.content")
            if content or not message.get("tool_calls"):
                converted.append(Message(Role.ASSISTANT, content, channel="final"))
        elif role == "tool":
            call_id = str(message.get("tool_call_id"))
            if call_id not in call_names:
                raise TranslationError(f"{field}.tool_call_id: {call_id!r} answers no earlier assistant tool call")
            converted.append(_tool_result_message(call_names[call_id], _text_of(message.get("content"),
                                                                                  f"{field}.content")))
        else:
            raise TranslationError(f"{field}.role: unknown role {role!r}")
    return ("\n\n".join(instructions) or None), converted


def response_items(items: str | Sequence[Mapping[str, Any]], call_names: dict[str, str] | None = None) -> list[Message]:
    """A Responses ``input`` (a string or items) -> Harmony messages; instructions come separately.

    ``call_names``: the function name of each call id made earlier (a previous response's); the
    items' own calls are added to it.
    """
    if isinstance(items, str):
        return [Message(Role.USER, items)]
    converted: list[Message] = []
    call_names = {} if call_names is None else call_names
    for index, item in enumerate(items):
        field = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _text_of(item.get("content"), f"{field}.content")
            if role in ("system", "developer"):
                converted.append(Message(Role.DEVELOPER, DeveloperContent(instructions=text)))
            elif role == "user":
                converted.append(Message(Role.USER, text))
            elif role == "assistant":
                converted.append(Message(Role.ASSISTANT, text, channel="final"))
            else:
                raise TranslationError(f"{field}.role: unknown role {role!r}")
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or ()
            converted.append(Message(Role.ASSISTANT, _text_of(
                [dict(part, type="text") for part in parts], f"{field}.content"), channel="analysis"))
        elif kind == "function_call":
            call_names[str(item.get("call_id"))] = item["name"]
            converted.append(_tool_call_message(item["name"], str(item.get("arguments") or "{}")))
        elif kind == "function_call_output":
            call_id = str(item.get("call_id"))
            if call_id not in call_names:
                raise TranslationError(f"{field}.call_id: {call_id!r} answers no function_call item")
            output = item.get("output")
            converted.append(_tool_result_message(call_names[call_id],
                                                  output if isinstance(output, str) else json.dumps(output)))
        else:
            raise TranslationError(f"{field}.type: unsupported item type {kind!r}")
    return converted


def function_tools(tools: Sequence[Mapping[str, Any]] | None, *, nested: bool) -> list[ToolDescription]:
    """OpenAI function tools -> Harmony's.

    ``nested``: chat's ``{"type": "function", "function": {...}}``; else the Responses API's flat ones.
    """
    described = []
    for index, tool in enumerate(tools or ()):
        if tool.get("type") != "function":
            raise TranslationError(f"tools[{index}].type: only function tools are supported, got {tool.get('type')!r}")
        spec = tool.get("function") if nested else tool
        if not isinstance(spec, Mapping) or not spec.get("name"):
            raise TranslationError(f"tools[{index}]: a function tool needs a name")
        described.append(ToolDescription(spec["name"], spec.get("description") or "", spec.get("parameters")))
    return described


def tool_choice_of(choice: str | Mapping[str, Any] | None, *, nested: bool) -> ToolChoice:
    """OpenAI's ``tool_choice`` -> ``auto``, ``none``, ``required`` or a function's name.

    ``nested``: chat's named form ``{"type": "function", "function": {"name": ...}}``; else the
    Responses API's ``{"type": "function", "name": ...}``.
    """
    if choice is None or isinstance(choice, str):
        if choice not in (None, "auto", "none", "required"):
            raise TranslationError(f"tool_choice: expected auto, none, required or a function, got {choice!r}")
        return choice or "auto"
    name = (choice.get("function") or {}).get("name") if nested else choice.get("name")
    if choice.get("type") != "function" or not name:
        form = '{"function": {"name": ...}}' if nested else '{"name": ...}'
        raise TranslationError(f'tool_choice: a named choice is {{"type": "function", ...}} with {form}')
    return name


def build_prompt(messages: Sequence[Message], tokenizer: Tokenizer, *, instructions: str | None = None,
                 tools: Sequence[ToolDescription] = (), tool_choice: ToolChoice = "auto",
                 reasoning_effort: str | None = None, today: datetime.date | None = None) -> Prompt:
    """The Harmony prompt of a turn: system, developer (instructions and tools), the messages, the reply's start.

    ``tool_choice``: ``none`` renders no tools; ``required`` starts the reply as a call to some
    function; a function's name starts it as a call to that one.
    """
    names = [tool.name for tool in tools]
    if tool_choice not in ("auto", "none", "required") and tool_choice not in names:
        raise TranslationError(f"tool_choice: no function named {tool_choice!r} among the tools {names}")
    if tool_choice == "required" and not tools:
        raise TranslationError("tool_choice: 'required' needs tools")
    try:
        effort = ReasoningEffort.parse(reasoning_effort or "medium")
    except ValueError as error:
        raise TranslationError(f"reasoning_effort: {error}") from None
    system = Message(Role.SYSTEM, SystemContent(reasoning_effort=effort,
                                                conversation_start_date=today or datetime.date.today()))
    rendered_tools = () if tool_choice == "none" else tuple(tools)
    head = [system]
    if instructions or rendered_tools:
        head.append(Message(Role.DEVELOPER, DeveloperContent(instructions=instructions, tools=rendered_tools)))
    token_ids = encode_for_completion(drop_answered_analysis([*head, *messages]), tokenizer, auto_drop_analysis=False)
    forced_text = ""
    if tool_choice == "required":
        forced_text = f"<|channel|>commentary to={FUNCTIONS_NAMESPACE}."
    elif tool_choice not in ("auto", "none"):
        forced_text = f"<|channel|>commentary to={FUNCTIONS_NAMESPACE}.{tool_choice} <|constrain|>json<|message|>"
    forced = tokenizer.encode(forced_text, allowed_special="all") if forced_text else []
    return Prompt(token_ids + forced, forced)


@dataclasses.dataclass(frozen=True)
class ReplyEvent:
    """What one generated token added: ``kind`` is ``reasoning``, ``content``, ``tool_call`` (a new
    call: ``call`` has its id and name) or ``arguments`` (text of call ``index``)."""

    kind: Literal["reasoning", "content", "tool_call", "arguments"]
    text: str = ""
    index: int = 0
    call: ToolCall | None = None


@dataclasses.dataclass(frozen=True)
class Reply:
    """A whole assistant reply in OpenAI's terms."""

    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    stopped_for_call: bool  # it ended with <|call|>: the caller runs the tool


class ReplyParser:
    """Generated Harmony tokens -> :class:`ReplyEvent`, token by token; :meth:`finish` gives the :class:`Reply`.

    Lenient (never raises), since a model may emit anything: text outside Harmony's structure
    counts as content, streamed as it comes, and :meth:`finish` logs one warning for the reply.
    """

    def __init__(self, tokenizer: Tokenizer, forced: Sequence[int] = ()):
        self._parser = StreamParser(tokenizer, Role.ASSISTANT, strict=False)
        self._calls: list[ToolCall] = []
        self._open_call: tuple[int, str] | None = None  # (message index, recipient) of the call being read
        self._stopped_for_call = False
        for token in forced:
            self._parser.process(token)

    def feed(self, token: int) -> list[ReplyEvent]:
        parser = self._parser
        text = parser.process(token)
        if parser.stopped:
            self._stopped_for_call = parser.messages and parser.messages[-1].recipient is not None
        events = []
        recipient = parser.current_recipient
        if recipient is not None and recipient.startswith(f"{FUNCTIONS_NAMESPACE}."):
            key = (len(parser.messages), recipient)
            if self._open_call != key:
                self._open_call = key
                call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", recipient.removeprefix(f"{FUNCTIONS_NAMESPACE}."), "")
                self._calls.append(call)
                events.append(ReplyEvent("tool_call", index=len(self._calls) - 1, call=call))
            if text:
                events.append(ReplyEvent("arguments", text, index=len(self._calls) - 1))
        elif text:
            events.append(ReplyEvent("reasoning" if parser.current_channel == "analysis" else "content", text))
        return events

    def close(self) -> list[ReplyEvent]:
        """Generation ended: what the message it cut still adds (a header cut short is content)."""
        self._parser.process_eos()
        text = self._parser.last_content_delta
        if not text:
            return []
        channel = self._parser.messages[-1].channel
        return [ReplyEvent("reasoning" if channel == "analysis" else "content", text)]

    def finish(self) -> Reply:
        """The reply so far, its last message completed if generation was cut (call :meth:`close` first
        to stream what that adds)."""
        self._parser.process_eos()
        if self._parser.misplaced:
            logger.warning("the model wrote text outside Harmony's message structure; it is returned as content")
        reasoning, content, arguments = [], [], []
        for message in self._parser.messages:
            if message.recipient is not None and message.recipient.startswith(f"{FUNCTIONS_NAMESPACE}."):
                arguments.append(message.content)
            elif message.channel == "analysis":
                reasoning.append(message.content)
            elif message.role is Role.ASSISTANT:
                content.append(message.content)
        calls = [dataclasses.replace(call, arguments=text) for call, text in zip(self._calls, arguments)]
        return Reply("".join(reasoning), "".join(content), calls, bool(self._stopped_for_call))
