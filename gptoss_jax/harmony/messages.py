"""Harmony's messages and their parts: roles, reasoning efforts, tools, system and developer
content, conversations; and the text of the format's control tokens.

Every class checks its input when made, so a renderer never meets a message Harmony cannot
express. Names follow openai_harmony's types where they match (`Role`, `Message`,
`SystemContent`, ...); the values are plain dataclasses rather than its builder methods.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gptoss_jax.errors import GptOssError

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


class HarmonyError(GptOssError):
    """Harmony input that is not valid: an unknown role or reasoning effort, a misplaced content."""


class _NamedChoice(StrEnum):
    """A closed set of names that user input is checked against."""

    def __init_subclass__(cls, what: str, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._what = what  # how an error message calls the set

    @classmethod
    def parse(cls, value: str) -> _NamedChoice:
        """The member named `value`.

        Raises:
            HarmonyError: `value` names no member; the message lists the valid names.
        """
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(member.value for member in cls)
            raise HarmonyError(f"unknown {cls._what} {value!r}; expected one of {names}") from None


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
            raise HarmonyError(f"tool namespace names must be unique, got {names}")


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
            raise HarmonyError(f"SystemContent belongs in a system message, not a {role.value} message")
        if isinstance(self.content, DeveloperContent) and role is not Role.DEVELOPER:
            raise HarmonyError(f"DeveloperContent belongs in a developer message, not a {role.value} message")
        if role is Role.TOOL and not self.name:
            raise HarmonyError(
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
