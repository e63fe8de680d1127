"""Harmony, gpt-oss's chat format: messages, rendering to text and tokens, streaming parsing.

A native implementation (no `openai_harmony`, no vocabulary download) of the format that
openai/harmony documents in `docs/format.md` and implements in `src/encoding.rs`; the rendered
text matches that renderer's test data character for character.

A message is `<|start|>{header}<|message|>{content}{terminator}` with
`header = role[":" name] [" to=" recipient] ["<|channel|>" channel] [" " content_type]`;
tool messages write the tool's name in place of the role. Stored history always ends messages
with `<|end|>` (or `<|call|>` for an assistant tool call); `<|return|>` only ends a generation.

Special-token ids always come from the `Tokenizer`, so the same code serves o200k_harmony and
the small demo tokenizer.
"""

from __future__ import annotations

import codecs
import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gptoss_jax.errors import GptOssError
from gptoss_jax.tokenizer import Tokenizer, UnknownSpecialTokenError

START = "<|start|>"
END = "<|end|>"
MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
CONSTRAIN = "<|constrain|>"
RETURN = "<|return|>"
CALL = "<|call|>"

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
DEFAULT_VALID_CHANNELS = ("analysis", "commentary", "final")
FUNCTIONS_NAMESPACE = "functions"


class _NamedChoice(StrEnum):
    """A closed set of names that user input is checked against."""

    def __init_subclass__(cls, what: str, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._what = what  # how an error message calls the set

    @classmethod
    def parse(cls, value: str) -> _NamedChoice:
        """The member named `value`.

        Raises:
            ValueError: `value` names no member; the message lists the valid names.
        """
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(member.value for member in cls)
            raise ValueError(f"unknown {cls._what} {value!r}; expected one of {names}") from None


class Role(_NamedChoice, what="role"):
    """Who wrote a message; also the order of authority (system first)."""

    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ReasoningEffort(_NamedChoice, what="reasoning effort"):
    """How long the model reasons; the `Reasoning: ...` line of the system message."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


@dataclass(frozen=True)
class ToolDescription:
    """A tool the model may call: its name, what it does, and its JSON-schema parameters."""

    name: str
    description: str
    parameters: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.parameters is not None and not isinstance(self.parameters, Mapping):
            raise TypeError(
                f"tool {self.name!r}: parameters must be a JSON-schema object (a mapping), "
                f"got {type(self.parameters).__name__}"
            )


@dataclass(frozen=True)
class ToolNamespace:
    """A group of tools under one name, rendered as `## name` (e.g. the built-in `browser`)."""

    name: str
    description: str | None = None
    tools: tuple[ToolDescription, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tools", tuple(self.tools))


@dataclass(frozen=True)
class SystemContent:
    """The system message: identity, dates, reasoning effort, built-in tools, valid channels.

    Function tools belong in `DeveloperContent`, not here; built-in tool namespaces (browser,
    python) go in `tools`. `None` leaves a line out.
    """

    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    conversation_start_date: str | datetime.date | None = None
    reasoning_effort: ReasoningEffort | str = ReasoningEffort.MEDIUM
    valid_channels: tuple[str, ...] = DEFAULT_VALID_CHANNELS
    channel_required: bool = True
    tools: tuple[ToolNamespace, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasoning_effort", ReasoningEffort.parse(self.reasoning_effort))
        if isinstance(self.conversation_start_date, datetime.date):
            object.__setattr__(self, "conversation_start_date", self.conversation_start_date.isoformat())
        object.__setattr__(self, "valid_channels", tuple(self.valid_channels))
        object.__setattr__(self, "tools", tuple(self.tools))
        names = [namespace.name for namespace in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool namespace names must be unique, got {names}")


@dataclass(frozen=True)
class DeveloperContent:
    """The developer message: instructions (the usual "system prompt") and function tools.

    Function tools are rendered as the TypeScript-like `namespace functions { ... }` and are
    called with recipient `functions.<name>` on the commentary channel.
    """

    instructions: str | None = None
    tools: tuple[ToolDescription, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tools", tuple(self.tools))


MessageContent = str | SystemContent | DeveloperContent


@dataclass(frozen=True)
class Message:
    """One Harmony message.

    Attributes:
        role: the author's role.
        content: the text, or `SystemContent` / `DeveloperContent` for those roles.
        name: the author's name; for a tool message, the tool (e.g. `functions.get_weather`),
            which Harmony writes in place of the role.
        channel: `analysis`, `commentary` or `final` for assistant messages.
        recipient: whom the message is for: a tool for an assistant tool call
            (`functions.get_weather`), `assistant` for a tool result.
        content_type: e.g. `<|constrain|>json` for a JSON tool call.
    """

    role: Role | str
    content: MessageContent
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None

    def __post_init__(self) -> None:
        role = Role.parse(self.role)
        object.__setattr__(self, "role", role)
        if not isinstance(self.content, (str, SystemContent, DeveloperContent)):
            raise TypeError(
                "message content must be a str, SystemContent or DeveloperContent, "
                f"got {type(self.content).__name__}"
            )
        if isinstance(self.content, SystemContent) and role is not Role.SYSTEM:
            raise ValueError(f"SystemContent belongs in a system message, not a {role.value} message")
        if isinstance(self.content, DeveloperContent) and role is not Role.DEVELOPER:
            raise ValueError(f"DeveloperContent belongs in a developer message, not a {role.value} message")
        if role is Role.TOOL and not self.name:
            raise ValueError(
                "a tool message needs name= (the tool, e.g. 'functions.get_weather'), "
                "which Harmony writes in place of the role"
            )


@dataclass(frozen=True)
class Conversation:
    """An ordered, immutable list of messages."""

    messages: tuple[Message, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        messages = tuple(self.messages)
        for message in messages:
            if not isinstance(message, Message):
                raise TypeError(f"a conversation holds Message objects, got {type(message).__name__}")
        object.__setattr__(self, "messages", messages)

    def extended(self, messages: Iterable[Message]) -> Conversation:
        """A new conversation with `messages` appended."""
        return Conversation(self.messages + tuple(messages))


# ----------------------------------------------------------------------------------------------
# Rendering


class _SpecialToken(str):
    """A rendered piece that is one special token rather than text to tokenize."""


def _lines(text: str) -> list[str]:
    """`text` split into lines the way Harmony's renderer (Rust `str::lines`) splits it.

    Unlike `str.splitlines`, only `\\n` ends a line (a `\\r` before it is dropped), and a
    trailing newline does not start an empty last line.
    """
    if not text:
        return []
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _json_value(value: Any) -> str:
    # Compact, like serde_json's Display of a value, which Harmony uses for non-string defaults.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _field(schema: Any, key: str) -> Any:
    return schema.get(key) if isinstance(schema, Mapping) else None


def _is_enum(schema: Any) -> bool:
    values = _field(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _default_text(schema: Mapping[str, Any]) -> str:
    """A property's default as Harmony comments it: enum strings bare, other strings quoted."""
    default = schema["default"]
    if isinstance(default, str):
        return default if _is_enum(schema) else f'"{default}"'
    return _json_value(default)


def _with_nullable(schema: Any, type_text: str) -> str:
    if _field(schema, "nullable") is True and "null" not in type_text:
        return f"{type_text} | null"
    return type_text


def _schema_to_typescript(schema: Any, indent: str) -> str:
    """A JSON schema as the TypeScript-like type Harmony puts in tool signatures."""
    one_of = _field(schema, "oneOf")
    if isinstance(one_of, list):
        return _top_level_one_of(one_of, indent)
    schema_type = _field(schema, "type")
    if isinstance(schema_type, list):
        names = ["number" if name == "integer" else name for name in schema_type if isinstance(name, str)]
        return " | ".join(names) if names else "any"
    if schema_type == "object":
        return _object_to_typescript(schema, indent)
    if schema_type == "string":
        values = _field(schema, "enum")
        strings = [value for value in values if isinstance(value, str)] if isinstance(values, list) else []
        return " | ".join(f'"{value}"' for value in strings) if strings else "string"
    if schema_type in ("number", "integer"):
        return "number"
    if schema_type == "boolean":
        return "boolean"
    if schema_type == "array":
        items = _field(schema, "items")
        return f"{_schema_to_typescript(items, indent)}[]" if items is not None else "Array<any>"
    return "any"


def _top_level_one_of(variants: list[Any], indent: str) -> str:
    out = []
    for variant in variants:
        variant_text = _with_nullable(variant, _schema_to_typescript(variant, indent + "   "))
        comments = []
        description = _field(variant, "description")
        if isinstance(description, str):
            comments.append(description)
        if isinstance(variant, Mapping) and "default" in variant:
            # Here Harmony quotes every string default, enum or not (serde_json's Display).
            default = variant["default"]
            plain = isinstance(default, str) and not _is_enum(variant)
            comments.append(f'default: "{default}"' if plain else f"default: {_json_value(default)}")
        trailer = f" // {' '.join(comments)}" if comments else ""
        out.append(f"\n{indent} | {variant_text}{trailer}")
    return "".join(out)


def _object_to_typescript(schema: Mapping[str, Any], indent: str) -> str:
    out = []
    description = schema.get("description")
    if isinstance(description, str):
        out.append(f"{indent}// {description}\n")
    out.append("{\n")
    properties = schema.get("properties")
    if isinstance(properties, Mapping):
        required_list = schema.get("required")
        required = set(required_list) if isinstance(required_list, list) else set()
        for key, prop in properties.items():
            marker = "" if key in required else "?"
            title = _field(prop, "title")
            if isinstance(title, str):
                out.append(f"{indent}// {title}\n{indent}//\n")
            has_one_of = _field(prop, "oneOf") is not None
            prop_description = _field(prop, "description")
            if not has_one_of and isinstance(prop_description, str):
                out.append(f"{indent}// {prop_description}\n")
            examples = _field(prop, "examples")
            if isinstance(examples, list) and examples:
                out.append(f"{indent}// Examples:\n")
                out.extend(f'{indent}// - "{example}"\n' for example in examples if isinstance(example, str))
            one_of = _field(prop, "oneOf")
            if isinstance(one_of, list):
                out.append(_one_of_property(key, marker, prop, one_of, indent))
                continue
            type_text = _with_nullable(prop, _schema_to_typescript(prop, indent + "    "))
            line = f"{indent}{key}{marker}: {type_text},"
            if not has_one_of and isinstance(prop, Mapping) and "default" in prop:
                line += f" // default: {_default_text(prop)}"
            out.append(line + "\n")
    out.append(f"{indent}}}")
    return "".join(out)


def _one_of_property(key: str, marker: str, prop: Mapping[str, Any], variants: list[Any], indent: str) -> str:
    out = []
    description = prop.get("description")
    description = description if isinstance(description, str) else None
    # The property's description goes above the name unless the first variant repeats it.
    first_description = _field(variants[0], "description") if variants else None
    described_above = description is not None and first_description != description
    if described_above:
        out.append(f"{indent}// {description}\n")
    if "default" in prop:
        out.append(f"{indent}// default: {_default_text(prop)}\n")
    out.append(f"{indent}{key}{marker}:\n")
    for position, variant in enumerate(variants):
        variant_text = _with_nullable(variant, _schema_to_typescript(variant, indent + "   "))
        comments = []
        variant_description = _field(variant, "description")
        if not (position == 0 and described_above) and isinstance(variant_description, str):
            if variant_description != description:
                comments.append(variant_description)
        if isinstance(variant, Mapping) and "default" in variant:
            comments.append(f"default: {_default_text(variant)}")
        trailer = f" // {' '.join(comments)}" if comments else ""
        out.append(f"{indent} | {variant_text}{trailer}\n")
    out.append(f"{indent},\n")
    return "".join(out)


def _tools_section(namespaces: Iterable[ToolNamespace]) -> str:
    sections = ["# Tools"]
    # Harmony keeps namespaces in a map sorted by name.
    for namespace in sorted(namespaces, key=lambda ns: ns.name):
        lines = [f"## {namespace.name}\n"]
        description_lines = _lines(namespace.description or "")
        # Beside TypeScript declarations the description must be a comment; alone it is prose.
        lines += [f"// {line}" for line in description_lines] if namespace.tools else description_lines
        if namespace.tools:
            lines.append(f"namespace {namespace.name} {{\n")
            for tool in namespace.tools:
                lines += [f"// {line}" for line in _lines(tool.description)]
                if tool.parameters is None:
                    lines.append(f"type {tool.name} = () => any;\n")
                else:
                    parameters = _schema_to_typescript(tool.parameters, "")
                    lines.append(f"type {tool.name} = (_: {parameters}) => any;\n")
            lines.append(f"}} // namespace {namespace.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _render_system(content: SystemContent, conversation_has_function_tools: bool) -> str:
    sections = []
    top = []
    if content.model_identity is not None:
        top.append(content.model_identity)
    if content.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {content.knowledge_cutoff}")
    if content.conversation_start_date is not None:
        top.append(f"Current date: {content.conversation_start_date}")
    if top:
        sections.append("\n".join(top))
    sections.append(f"Reasoning: {content.reasoning_effort.value}")
    if content.tools:
        sections.append(_tools_section(content.tools))
    if content.valid_channels:
        channels = f"# Valid channels: {', '.join(content.valid_channels)}."
        if content.channel_required:
            channels += " Channel must be included for every message."
        if conversation_has_function_tools:
            channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(channels)
    return "\n\n".join(sections)


def _render_developer(content: DeveloperContent) -> str:
    sections = []
    if content.instructions is not None:
        sections += ["# Instructions", content.instructions]
    if content.tools:
        sections.append(_tools_section([ToolNamespace(FUNCTIONS_NAMESPACE, None, content.tools)]))
    return "\n\n".join(sections)


def _message_pieces(message: Message, conversation_has_function_tools: bool) -> list[str]:
    """The message as text pieces and `_SpecialToken`s, split where Harmony's renderer splits.

    Harmony tokenizes each piece on its own; keeping the same pieces gives the same token ids.
    """
    pieces: list[str] = [_SpecialToken(START)]
    if message.role is Role.TOOL:
        pieces.append(message.name)
    else:
        pieces.append(message.role.value)
        if message.name is not None:
            pieces.append(f":{message.name}")
    if message.recipient is not None:
        pieces.append(f" to={message.recipient}")
    if message.channel is not None:
        pieces += [_SpecialToken(CHANNEL), message.channel]
    if message.content_type is not None:
        if message.content_type.startswith(CONSTRAIN):
            # <|constrain|> must stay one special token (Harmony issue #27), so it is not
            # part of the text that gets tokenized.
            pieces += [" ", _SpecialToken(CONSTRAIN)]
            rest = message.content_type.removeprefix(CONSTRAIN)
            if rest:
                pieces.append(rest)
        else:
            pieces.append(f" {message.content_type}")
    pieces.append(_SpecialToken(MESSAGE))
    if isinstance(message.content, SystemContent):
        pieces.append(_render_system(message.content, conversation_has_function_tools))
    elif isinstance(message.content, DeveloperContent):
        pieces.append(_render_developer(message.content))
    else:
        pieces.append(message.content)
    is_tool_call = message.role is Role.ASSISTANT and message.recipient is not None
    pieces.append(_SpecialToken(CALL if is_tool_call else END))
    return pieces


def _as_messages(conversation: Conversation | Sequence[Message]) -> tuple[Message, ...]:
    if isinstance(conversation, Conversation):
        return conversation.messages
    return Conversation(tuple(conversation)).messages


def _kept_messages(messages: tuple[Message, ...], auto_drop_analysis: bool) -> list[Message]:
    """The messages to render, without the chain of thought of finished turns.

    An analysis message is dropped when a `final` message follows it and a user message
    follows that final: the turn it belongs to ended with an answer and a new turn began.
    The current turn's analysis, including the reasoning between a tool call and its result,
    is kept. This is the rule docs/format.md states and reproduces every documented rendering
    (test_dropping_cot_by_default, test_does_not_drop_if_ongoing_analysis,
    test_keep_analysis_between_finals). openai_harmony's code approximates it: when the last
    assistant message is a final one, it drops the analysis before the conversation's first
    final. The two differ once two turns were answered, or when a tool call follows an
    answered turn; there this module drops the old analysis and openai_harmony keeps it.
    """
    if not auto_drop_analysis:
        return list(messages)
    last_user = max((i for i, m in enumerate(messages) if m.role is Role.USER), default=0)
    last_answered = max((i for i, m in enumerate(messages[:last_user]) if m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if not (m.channel == "analysis" and i < last_answered)]


def _conversation_pieces(
    conversation: Conversation | Sequence[Message], next_role: Role | str | None, auto_drop_analysis: bool
) -> list[str]:
    messages = _as_messages(conversation)
    has_function_tools = any(
        isinstance(m.content, DeveloperContent) and m.content.tools for m in messages
    )
    pieces: list[str] = []
    for message in _kept_messages(messages, auto_drop_analysis):
        pieces += _message_pieces(message, has_function_tools)
    if next_role is not None:
        pieces += [_SpecialToken(START), Role.parse(next_role).value]
    return pieces


def render_conversation(
    conversation: Conversation | Sequence[Message], *, auto_drop_analysis: bool = True
) -> str:
    """The conversation as Harmony text (no BOS).

    For reading and tests: the text cannot tell special tokens from message text that happens
    to spell them. Feed the model `encode_conversation` instead.

    Args:
        conversation: the messages.
        auto_drop_analysis: leave out the analysis (chain of thought) of turns that ended in a
            final answer before the latest user message (see `_kept_messages`).
    """
    return "".join(_conversation_pieces(conversation, None, auto_drop_analysis))


def render_for_completion(
    conversation: Conversation | Sequence[Message],
    next_role: Role | str = Role.ASSISTANT,
    *,
    auto_drop_analysis: bool = True,
) -> str:
    """`render_conversation` followed by `<|start|>{next_role}`: the prompt for the next turn.

    Raises:
        ValueError: `next_role` is not a Harmony role.
    """
    return "".join(_conversation_pieces(conversation, next_role, auto_drop_analysis))


def _encode_pieces(pieces: list[str], tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, _SpecialToken):
            ids.append(tokenizer.special_token_id(piece))
        else:
            # Ordinary encoding: message text that spells a special token stays text.
            ids += tokenizer.encode(piece)
    return ids


def encode_conversation(
    conversation: Conversation | Sequence[Message], tokenizer: Tokenizer, *, auto_drop_analysis: bool = True
) -> list[int]:
    """The token ids of `render_conversation`, with every control token a single special token."""
    return _encode_pieces(_conversation_pieces(conversation, None, auto_drop_analysis), tokenizer)


def encode_for_completion(
    conversation: Conversation | Sequence[Message],
    tokenizer: Tokenizer,
    next_role: Role | str = Role.ASSISTANT,
    *,
    auto_drop_analysis: bool = True,
) -> list[int]:
    """The token ids of `render_for_completion`: the prompt to generate the next turn from.

    Raises:
        ValueError: `next_role` is not a Harmony role.
    """
    return _encode_pieces(_conversation_pieces(conversation, next_role, auto_drop_analysis), tokenizer)


# ----------------------------------------------------------------------------------------------
# Token ids and parsing


@dataclass(frozen=True)
class _HarmonyTokenIds:
    start: int
    end: int
    message: int
    return_: int
    call: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> _HarmonyTokenIds:
        try:
            return cls(*(tokenizer.special_token_id(name) for name in (START, END, MESSAGE, RETURN, CALL)))
        except UnknownSpecialTokenError as error:
            raise ValueError(
                f"this tokenizer lacks a Harmony special token ({error}); use gpt-oss's "
                "tokenizer.json or build_demo_tokenizer"
            ) from None

    @property
    def stops(self) -> frozenset[int]:
        return frozenset((self.return_, self.call))

    @property
    def message_ends(self) -> frozenset[int]:
        return frozenset((self.end, self.return_, self.call))


def stop_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Where assistant generation stops: `<|return|>` (answer done) and `<|call|>` (tool call).

    Not `<|end|>`: the model ends its analysis message with it and goes on to the final one
    (spec section 4.5; Harmony's `stop_tokens_for_assistant_actions`).

    Raises:
        ValueError: the tokenizer lacks the Harmony special tokens.
    """
    return _HarmonyTokenIds.of(tokenizer).stops


class HarmonyParseError(GptOssError):
    """Generated tokens that do not form Harmony messages."""


@dataclass(frozen=True)
class _Header:
    role: Role
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


def _take_channel(header: str) -> tuple[str | None, str]:
    """The channel named after `<|channel|>` (up to whitespace or `<`), and the header without it."""
    marker = header.find(CHANNEL)
    if marker < 0:
        return None, header
    after = header[marker + len(CHANNEL) :]
    length = next((i for i, char in enumerate(after) if char.isspace() or char == "<"), len(after))
    if length == 0:
        raise HarmonyParseError(f"header {header!r} has a channel marker but no channel name")
    return after[:length], header[:marker] + after[length:]


def _split_role(word: str) -> tuple[Role, str | None]:
    """The author in a header's first word: `role`, `role:name`, or a tool's name."""
    role_text, _, name = word.partition(":")
    try:
        return Role(role_text), (name or None)
    except ValueError:
        # Tool messages carry the tool's name (`functions.get_weather`) in place of the role.
        return Role.TOOL, word


def _parse_header(header: str, role: Role | None) -> _Header:
    """Read a message header (the text between `<|start|>` and `<|message|>`).

    `role` is the role already known from the prompt (`<|start|>assistant` ends it), else None.
    The recipient may come before or after the channel; a content type follows the recipient.
    """
    channel, rest = _take_channel(header)
    # The model sometimes omits the space before <|constrain|>; add it so that it splits off.
    parts = rest.replace(CONSTRAIN, f" {CONSTRAIN}").split()
    name = None
    if role is None:
        if not parts:
            raise HarmonyParseError(f"header {header!r} has no role")
        role, name = _split_role(parts.pop(0))
    elif parts and parts[0] == role.value:
        parts.pop(0)
    recipient = content_type = None
    if parts:
        last = parts.pop()
        if last.startswith("to="):
            recipient = last.removeprefix("to=")
        elif not parts:
            recipient = last
        else:
            content_type = last
            recipient = parts.pop().removeprefix("to=")
    if parts:
        raise HarmonyParseError(f"unexpected words {' '.join(parts)!r} in message header {header!r}")
    return _Header(role, name, channel, recipient, content_type)


_PARSER_STATE_EXPECT_START = "expect_start"
_PARSER_STATE_HEADER = "header"
_PARSER_STATE_CONTENT = "content"


class StreamParser:
    """Splits generated token ids, fed one at a time, into Harmony messages.

    Typical use after prompting with `encode_for_completion(...)` (which ends in
    `<|start|>assistant`)::

        parser = StreamParser(tokenizer)                 # role=assistant: header comes next
        for token in generated_tokens:
            delta = parser.process(token)                # new content text, possibly ""
            show(parser.current_channel, delta)
            if parser.stopped:                           # <|return|> or <|call|>
                break
        parser.process_eos()                             # finish a message cut off by a limit
        new_messages = parser.messages

    Messages end at `<|end|>`, `<|return|>` or `<|call|>`; content is decoded incrementally,
    so a character split across tokens appears once complete, and invalid UTF-8 becomes U+FFFD.

    In strict mode (the default) malformed output raises `HarmonyParseError`. With
    `strict=False` nothing raises, which suits a model that may emit anything (the random demo
    model): text outside any message, and a header that cannot be read or never reaches
    `<|message|>`, become content of a message from `role` (assistant when `role` is None).
    """

    def __init__(
        self, tokenizer: Tokenizer, role: Role | str | None = Role.ASSISTANT, *, strict: bool = True
    ) -> None:
        """Start a parser.

        Args:
            tokenizer: the tokenizer that produced the ids.
            role: the role whose header the prompt already began (`<|start|>assistant`), so the
                first tokens are the rest of that header; None when the first token is
                `<|start|>`.
            strict: raise on malformed output (see the class docstring).

        Raises:
            ValueError: unknown role, role `tool`, or a tokenizer without the Harmony special
                tokens.
        """
        self._tokenizer = tokenizer
        self._ids = _HarmonyTokenIds.of(tokenizer)
        self._header_role = Role.parse(role) if role is not None else None
        if self._header_role is Role.TOOL:
            raise ValueError(
                "a parser cannot start inside a tool message's header: that header begins with "
                "the tool's name, so start with role=None and the <|start|> token"
            )
        self._fallback_role = self._header_role or Role.ASSISTANT
        self._strict = strict
        self._state = _PARSER_STATE_HEADER if role is not None else _PARSER_STATE_EXPECT_START
        self._header_tokens: list[int] = []
        self._header: _Header | None = None
        self._content: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._messages: list[Message] = []
        self._tokens: list[int] = []
        self._last_delta = ""
        self._stopped = False

    @property
    def messages(self) -> tuple[Message, ...]:
        """The messages completed so far."""
        return tuple(self._messages)

    @property
    def tokens(self) -> tuple[int, ...]:
        """Every token id processed so far."""
        return tuple(self._tokens)

    @property
    def stopped(self) -> bool:
        """Whether the last token processed was a stop token (`<|return|>` or `<|call|>`)."""
        return self._stopped

    @property
    def last_content_delta(self) -> str:
        """The content text the last token added ("" when it added none)."""
        return self._last_delta

    @property
    def current_content(self) -> str:
        """The content of the message being read so far."""
        return "".join(self._content)

    @property
    def current_role(self) -> Role | None:
        """The role of the message being read, once known."""
        if self._header is not None:
            return self._header.role
        return self._header_role if self._state == _PARSER_STATE_HEADER else None

    @property
    def current_channel(self) -> str | None:
        """The channel of the message whose content is being read."""
        return self._header.channel if self._header is not None else None

    @property
    def current_recipient(self) -> str | None:
        """The recipient of the message whose content is being read."""
        return self._header.recipient if self._header is not None else None

    @property
    def current_content_type(self) -> str | None:
        """The content type of the message whose content is being read."""
        return self._header.content_type if self._header is not None else None

    def process(self, token_id: int) -> str:
        """Consume one generated token and return the content text it added (maybe "").

        Raises:
            HarmonyParseError: in strict mode, the tokens do not form Harmony messages.
            ValueError: the id is outside the vocabulary.
        """
        self._tokens.append(token_id)
        self._last_delta = ""
        self._stopped = token_id in self._ids.stops
        ends_message = token_id in self._ids.message_ends
        if self._state == _PARSER_STATE_EXPECT_START:
            if token_id == self._ids.start:
                self._state = _PARSER_STATE_HEADER
                self._header_role = None
            elif self._strict:
                raise HarmonyParseError(
                    f"expected {START} to begin a message, got token {token_id} "
                    f"({self._tokenizer.decode([token_id])!r})"
                )
            elif not ends_message:
                self._begin_content(_Header(self._fallback_role))
                self._add_content(token_id)
        elif self._state == _PARSER_STATE_HEADER:
            if token_id == self._ids.message:
                self._begin_content_after_header()
            elif ends_message:
                self._end_inside_header()
            else:
                self._header_tokens.append(token_id)
        elif ends_message:
            self._finish_message()
        else:
            self._add_content(token_id)
        return self._last_delta

    def process_eos(self) -> None:
        """Finish at the end of generation: complete the message being read, if any.

        Call it when generation stopped without a message-ending token (a token limit).

        Raises:
            HarmonyParseError: in strict mode, generation ended inside a message header.
        """
        self._last_delta = ""
        if self._state == _PARSER_STATE_CONTENT:
            self._finish_message()
        elif self._state == _PARSER_STATE_HEADER and self._header_tokens:
            self._end_inside_header()

    def _header_text(self) -> str:
        return self._tokenizer.decode(self._header_tokens)

    def _begin_content_after_header(self) -> None:
        text = self._header_text()
        try:
            header = _parse_header(text, self._header_role)
            leftover = ""
        except HarmonyParseError:
            if self._strict:
                raise
            header, leftover = self._salvage_header(text)
        self._begin_content(header)
        if leftover:
            self._content.append(leftover)
            self._last_delta = leftover

    def _end_inside_header(self) -> None:
        if self._strict:
            raise HarmonyParseError(
                f"message ended before its header {self._header_text()!r} reached {MESSAGE}"
            )
        header, text = self._salvage_header(self._header_text())
        self._begin_content(header)
        self._content.append(text)
        self._last_delta = text
        self._finish_message()

    def _salvage_header(self, text: str) -> tuple[_Header, str]:
        """Lenient reading of a malformed header: its role and channel, the rest as content."""
        try:
            channel, rest = _take_channel(text)
        except HarmonyParseError:
            channel, rest = None, text
        rest = rest.strip()
        role, name = self._header_role, None
        if role is None:
            first, _, remainder = rest.partition(" ")
            role_text = first.partition(":")[0]
            if role_text in {r.value for r in Role if r is not Role.TOOL}:
                role, name = _split_role(first)
                rest = remainder.strip()
            else:
                role = self._fallback_role
        return _Header(role, name, channel), rest

    def _begin_content(self, header: _Header) -> None:
        self._header = header
        self._header_tokens = []
        self._content = []
        self._state = _PARSER_STATE_CONTENT

    def _add_content(self, token_id: int) -> None:
        delta = self._utf8.decode(self._tokenizer.decode_bytes([token_id]))
        if delta:
            self._content.append(delta)
        self._last_delta = delta

    def _finish_message(self) -> None:
        # An incomplete UTF-8 sequence left at the end becomes U+FFFD rather than vanishing.
        tail = self._utf8.decode(b"", final=True)
        if tail:
            self._content.append(tail)
            self._last_delta += tail
        header = self._header
        self._messages.append(
            Message(
                role=header.role,
                content="".join(self._content),
                name=header.name,
                channel=header.channel,
                recipient=header.recipient,
                content_type=header.content_type,
            )
        )
        self._header = None
        self._content = []
        self._state = _PARSER_STATE_EXPECT_START


def parse_completion(
    token_ids: Iterable[int],
    tokenizer: Tokenizer,
    role: Role | str | None = Role.ASSISTANT,
    *,
    strict: bool = True,
) -> list[Message]:
    """All messages in a finished generation (see `StreamParser` for `role` and `strict`)."""
    parser = StreamParser(tokenizer, role, strict=strict)
    for token_id in token_ids:
        parser.process(token_id)
    parser.process_eos()
    return list(parser.messages)
