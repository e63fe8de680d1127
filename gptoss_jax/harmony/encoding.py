"""openai_harmony's API names over this package, for code written against openai_harmony.

openai_harmony hangs rendering and parsing on an encoding object::

    encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)   # downloads o200k
    prompt = encoding.render_conversation_for_completion(conversation, Role.ASSISTANT)
    parser = StreamableParser(encoding, Role.ASSISTANT)

Here the encoding wraps the checkpoint's tokenizer instead, so nothing is downloaded::

    encoding = HarmonyEncoding(Tokenizer.from_pretrained_dir(checkpoint))
    prompt = encoding.render_conversation_for_completion(conversation, Role.ASSISTANT)
    parser = StreamableParser(encoding, Role.ASSISTANT)

The methods return what openai_harmony's return (lists of token ids) and take this package's
`Conversation` and `Message` dataclasses; openai_harmony's `RenderConversationConfig` is the
keyword `auto_drop_analysis`, which drops analysis as openai_harmony 0.0.8 does (the tests
check every rendering against it). Not offered: `render_conversation_for_training` (this
project does not train) and `decode_utf8` (`Tokenizer.decode` replaces invalid UTF-8 instead of
raising).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gptoss_jax.harmony.messages import Conversation, Message, Role
from gptoss_jax.harmony.parser import HarmonyTokenIds, StreamParser, parse_completion
from gptoss_jax.harmony.render import encode_conversation, encode_for_completion
from gptoss_jax.tokenizer import Tokenizer


class HarmonyEncoding:
    """Harmony rendering and parsing on one tokenizer, under openai_harmony's method names."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Raises `TokenizerError` when `tokenizer` lacks the Harmony special tokens."""
        self._ids = HarmonyTokenIds.of(tokenizer)
        self.tokenizer = tokenizer

    def render_conversation_for_completion(
        self,
        conversation: Conversation | Sequence[Message],
        next_turn_role: Role | str,
        *,
        auto_drop_analysis: bool = True,
    ) -> list[int]:
        """`encode_for_completion`: the prompt for the next turn, as token ids."""
        return encode_for_completion(
            conversation, self.tokenizer, next_turn_role, auto_drop_analysis=auto_drop_analysis
        )

    def render_conversation(
        self, conversation: Conversation | Sequence[Message], *, auto_drop_analysis: bool = True
    ) -> list[int]:
        """`encode_conversation`: the conversation's token ids."""
        return encode_conversation(conversation, self.tokenizer, auto_drop_analysis=auto_drop_analysis)

    def render(self, message: Message) -> list[int]:
        """One message's token ids."""
        return encode_conversation([message], self.tokenizer, auto_drop_analysis=False)

    def stop_tokens_for_assistant_actions(self) -> list[int]:
        """`stop_token_ids`: `<|return|>` and `<|call|>`, where assistant generation stops."""
        return sorted(self._ids.stops)

    def stop_tokens(self) -> list[int]:
        """Every token that ends a message: `<|return|>`, `<|call|>` and `<|end|>`."""
        return sorted(self._ids.message_ends)

    def parse_messages_from_completion_tokens(
        self, tokens: Iterable[int], role: Role | str | None = None, *, strict: bool = True
    ) -> list[Message]:
        """`parse_completion`: the messages in generated tokens."""
        return parse_completion(tokens, self.tokenizer, role, strict=strict)


class StreamableParser(StreamParser):
    """`StreamParser` made from a `HarmonyEncoding`, behaving as openai_harmony's: `process`
    returns the parser itself (so calls chain), and `last_content_delta` is None, not "", when
    the last token added no content."""

    def __init__(self, encoding: HarmonyEncoding, role: Role | str | None, *, strict: bool = True) -> None:
        super().__init__(encoding.tokenizer, role, strict=strict)

    def process(self, token_id: int) -> StreamableParser:
        super().process(token_id)
        return self

    @property
    def last_content_delta(self) -> str | None:
        """The content text the last token added, or None."""
        return super().last_content_delta or None
