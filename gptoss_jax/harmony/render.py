"""Rendering Harmony conversations: to text (for reading and tests) and to token ids (for the
model), with the chain of thought of answered turns left out.

A message is `<|start|>{header}<|message|>{content}{terminator}` with
`header = role[":" name] [" to=" recipient] ["<|channel|>" channel] [" " content_type]`;
tool messages write the tool's name in place of the role. Stored history always ends messages
with `<|end|>` (or `<|call|>` for an assistant tool call); `<|return|>` only ends a generation.

Token ids come from rendering piece by piece, each control token as its single special token
and each text piece tokenized on its own, where openai/harmony's renderer splits, so that the
ids equal that renderer's (checked against openai_harmony on o200k_harmony in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

from gptoss_jax.harmony.messages import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    FUNCTIONS_NAMESPACE,
    MESSAGE,
    START,
    Conversation,
    DeveloperContent,
    Message,
    Role,
    SystemContent,
    ToolNamespace,
)
from gptoss_jax.harmony.tool_schema import render_tools_section
from gptoss_jax.tokenizer import Tokenizer


class _SpecialToken(str):
    """A rendered piece that is one special token rather than text to tokenize."""



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
        sections.append(render_tools_section(content.tools))
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
        sections.append(render_tools_section([ToolNamespace(FUNCTIONS_NAMESPACE, None, content.tools)]))
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


def drop_answered_analysis(conversation: Conversation | Sequence[Message]) -> list[Message]:
    """The messages without the chain of thought of finished turns: Harmony's docs/format.md rule.

    An analysis message is dropped when a `final` message follows it and a user message
    follows that final: the turn it belongs to ended with an answer and a new turn began.
    The current turn's analysis, including the reasoning between a tool call and its result,
    is kept. docs/format.md states it ("drop any previous CoT content on subsequent sampling if
    the responses by the assistant ended in a message to the final channel", its example being
    the input after the next user message), and it reproduces every documented rendering
    (test_dropping_cot_by_default, test_does_not_drop_if_ongoing_analysis,
    test_keep_analysis_between_finals). The CLI's chat and the server render with it, then
    with ``auto_drop_analysis=False``.

    openai_harmony 0.0.8's ``auto_drop_analysis`` (this package's flag of that name too)
    approximates it, and the two differ (test_harmony_openai pins each case):

    - A conversation that ends in a final answer, with one answered turn: openai_harmony drops
      that turn's analysis, this rule keeps it, as both keep the last turn's analysis once two
      turns were answered (test_keep_analysis_between_finals).
    - Three or more turns: openai_harmony keeps the analysis of every answered turn but the
      first (openai/harmony pull request #96 reports it), this rule drops all of them.
    - A tool call after an answered turn: openai_harmony keeps the answered turn's analysis,
      this rule drops it.
    """
    messages = _as_messages(conversation)
    last_user = max((i for i, m in enumerate(messages) if m.role is Role.USER), default=0)
    last_answered = max((i for i, m in enumerate(messages[:last_user]) if m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if not (m.channel == "analysis" and i < last_answered)]


def _kept_messages(messages: tuple[Message, ...], auto_drop_analysis: bool) -> list[Message]:
    """The messages to render: with ``auto_drop_analysis``, openai_harmony 0.0.8's rule.

    When the conversation's last assistant message is a final answer, every analysis message
    before the conversation's first final message is dropped; otherwise nothing is
    (`render_conversation_into` in openai/harmony's src/encoding.rs). For Harmony's own rule,
    see `drop_answered_analysis`.
    """
    if not auto_drop_analysis:
        return list(messages)
    last_assistant = next((m for m in reversed(messages) if m.role is Role.ASSISTANT), None)
    if last_assistant is None or last_assistant.channel != "final":
        return list(messages)
    first_final = next(i for i, m in enumerate(messages) if m.channel == "final")
    return [m for i, m in enumerate(messages) if not (m.channel == "analysis" and i < first_final)]


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
        auto_drop_analysis: leave out analysis (chain of thought) as openai_harmony 0.0.8's flag
            of that name does (see `_kept_messages`); Harmony's docs/format.md rule is
            `drop_answered_analysis`, applied to the conversation first.
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
        HarmonyError: `next_role` is not a Harmony role.
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
        HarmonyError: `next_role` is not a Harmony role.
    """
    return _encode_pieces(_conversation_pieces(conversation, next_role, auto_drop_analysis), tokenizer)

