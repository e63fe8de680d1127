"""Parsing generated Harmony tokens into messages, one token at a time, and the tokens that
stop assistant generation.

The parser reads a header (role, channel, recipient, content type) and then content, which it
decodes incrementally, so a caller can show each token's text as it arrives. Its state is a
`StreamState`, as in openai_harmony's `StreamableParser`.
"""

from __future__ import annotations

import codecs
import enum
from collections.abc import Iterable
from dataclasses import dataclass

from gptoss_jax.harmony.messages import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    MESSAGE,
    RETURN,
    START,
    HarmonyError,
    Message,
    Role,
)
from gptoss_jax.tokenizer import Tokenizer, TokenizerError, UnknownSpecialTokenError


@dataclass(frozen=True)
class HarmonyTokenIds:
    """The ids of the Harmony control tokens in one tokenizer."""

    start: int
    end: int
    message: int
    return_: int
    call: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> HarmonyTokenIds:
        """Raises `TokenizerError` when the tokenizer lacks one of them."""
        try:
            return cls(*(tokenizer.special_token_id(name) for name in (START, END, MESSAGE, RETURN, CALL)))
        except UnknownSpecialTokenError as error:
            raise TokenizerError(
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
        TokenizerError: the tokenizer lacks the Harmony special tokens.
    """
    return HarmonyTokenIds.of(tokenizer).stops


class HarmonyParseError(HarmonyError):
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


MAX_HEADER_TOKENS = 64
"""A header longer than this is text the model wrote without a header (lenient parsing)."""


def _could_become_header(text: str) -> bool:
    """Whether ``text``, after a known role, can still grow into a header: it opens with a
    channel or a recipient (``to=...``), in at most four words."""
    words = text.replace(CONSTRAIN, f" {CONSTRAIN}").replace(CHANNEL, f" {CHANNEL}").split()
    if not words:
        return True
    first = words[0]
    opens = first.startswith((CHANNEL, "to=")) or "to=".startswith(first)
    return opens and len(words) <= 4


class StreamState(enum.Enum):
    """What the next token belongs to, in a `StreamParser` (openai_harmony's `StreamState`)."""

    EXPECT_START = enum.auto()
    """Between messages: the next token should be `<|start|>`."""
    HEADER = enum.auto()
    """A message header, until `<|message|>`."""
    CONTENT = enum.auto()
    """A message's content, until `<|end|>`, `<|return|>` or `<|call|>`."""


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
    `<|message|>`, become content of a message from `role` (assistant when `role` is None). A
    header that can no longer become one (text right after `<|start|>assistant`, with no
    channel) turns into content as soon as that is clear, so its text streams as it comes;
    `misplaced` then says that some text was placed this way.
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
            HarmonyError: unknown role, or role `tool`.
            TokenizerError: the tokenizer lacks the Harmony special tokens.
        """
        self._tokenizer = tokenizer
        self._ids = HarmonyTokenIds.of(tokenizer)
        self._header_role = Role.parse(role) if role is not None else None
        if self._header_role is Role.TOOL:
            raise HarmonyError(
                "a parser cannot start inside a tool message's header: that header begins with "
                "the tool's name, so start with role=None and the <|start|> token"
            )
        self._fallback_role = self._header_role or Role.ASSISTANT
        self._strict = strict
        self._state = StreamState.HEADER if role is not None else StreamState.EXPECT_START
        self._header_tokens: list[int] = []
        self._header: _Header | None = None
        self._content: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._messages: list[Message] = []
        self._tokens: list[int] = []
        self._last_delta = ""
        self._stopped = False
        self._misplaced = False

    @property
    def misplaced(self) -> bool:
        """Whether some text stood where Harmony allows none and became content (lenient mode)."""
        return self._misplaced

    @property
    def state(self) -> StreamState:
        """What the next token belongs to."""
        return self._state

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
    def header_text(self) -> str:
        """The text of the message header being read so far ("" outside a header)."""
        return self._header_text() if self._state is StreamState.HEADER else ""

    @property
    def current_content(self) -> str:
        """The content of the message being read so far."""
        return "".join(self._content)

    @property
    def current_role(self) -> Role | None:
        """The role of the message being read, once known."""
        if self._header is not None:
            return self._header.role
        return self._header_role if self._state is StreamState.HEADER else None

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
            TokenizerError: the id is outside the vocabulary.
        """
        self._tokens.append(token_id)
        self._last_delta = ""
        self._stopped = token_id in self._ids.stops
        ends_message = token_id in self._ids.message_ends
        if self._state is StreamState.EXPECT_START:
            if token_id == self._ids.start:
                self._state = StreamState.HEADER
                self._header_role = None
            elif self._strict:
                raise HarmonyParseError(
                    f"expected {START} to begin a message, got token {token_id} "
                    f"({self._tokenizer.decode([token_id])!r})"
                )
            elif not ends_message:
                self._misplaced = True
                self._begin_content(_Header(self._fallback_role))
                self._add_content(token_id)
        elif self._state is StreamState.HEADER:
            if token_id == self._ids.message:
                self._begin_content_after_header()
            elif ends_message:
                self._end_inside_header()
            else:
                self._header_tokens.append(token_id)
                if not self._strict and self._header_role is not None and (
                        len(self._header_tokens) > MAX_HEADER_TOKENS or not _could_become_header(self._header_text())):
                    self._header_as_content()
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
        if self._state is StreamState.CONTENT:
            self._finish_message()
        elif self._state is StreamState.HEADER and self._header_tokens:
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

    def _header_as_content(self) -> None:
        """Lenient: the header read so far is no header; it and what follows are content."""
        self._misplaced = True
        text = self._utf8.decode(self._tokenizer.decode_bytes(self._header_tokens)).lstrip()
        self._begin_content(_Header(self._header_role))
        self._content.append(text)
        self._last_delta = text

    def _salvage_header(self, text: str) -> tuple[_Header, str]:
        """Lenient reading of a malformed header: its role and channel, the rest as content."""
        self._misplaced = True
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
        self._state = StreamState.CONTENT

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
        self._state = StreamState.EXPECT_START


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
