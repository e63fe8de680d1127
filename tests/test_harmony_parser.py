"""Tests for gptoss_jax.harmony's streaming parser and stop tokens: round trips, header forms,
incremental UTF-8, strict and lenient parsing of malformed output."""

import random

import pytest

from gptoss_jax.harmony import (
    Conversation,
    HarmonyParseError,
    Message,
    Role,
    StreamParser,
    StreamState,
    SystemContent,
    encode_conversation,
    encode_for_completion,
    parse_completion,
    render_conversation,
    render_for_completion,
    stop_token_ids,
)
from gptoss_jax.tokenizer import Tokenizer, build_demo_tokenizer
from harmony_cases import ongoing_tool_call_conversation
from test_tokenizer import hugging_face_like_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The demo tokenizer, built on the spot; nothing is downloaded."""
    return build_demo_tokenizer(1024)


def test_parser_round_trip_of_a_generated_turn(tokenizer):
    history = [Message("system", SystemContent()), Message("user", "What is 2 + 2?")]
    reply = [
        Message("assistant", 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.', channel="analysis"),
        Message("assistant", "2 + 2 = 4.", channel="final"),
    ]
    prompt = encode_for_completion(history, tokenizer)
    full = encode_conversation(history + reply, tokenizer, auto_drop_analysis=False)  # the turn as generated
    assert full[: len(prompt)] == prompt
    generated = full[len(prompt) :]
    # At decode time the model ends its answer with <|return|>, not <|end|>.
    generated[-1] = tokenizer.special_token_id("<|return|>")

    parser = StreamParser(tokenizer, Role.ASSISTANT)
    for position, token_id in enumerate(generated):
        parser.process(token_id)
        assert parser.stopped == (position == len(generated) - 1)
    assert list(parser.messages) == reply
    assert parse_completion(generated, tokenizer) == reply


def test_parser_round_trip_of_every_message_kind(tokenizer):
    conversation = ongoing_tool_call_conversation().extended(
        [
            Message("tool", '{"temp": 20}', name="functions.get_weather", channel="commentary", recipient="assistant"),
            Message("assistant", "print(1 + 1)", channel="analysis", recipient="python"),
            Message("user", "Hallo, Grüße 😊 — ça va?", name="alice"),
            Message("assistant", "Très bien 👋🏾", channel="final"),
        ]
    )
    ids = encode_conversation(conversation, tokenizer, auto_drop_analysis=False)
    assert parse_completion(ids, tokenizer, role=None) == list(conversation.messages)


# openai/harmony docs/format.md and tests/test_harmony.py (test_tool_call_with_constrain_tokenized_correctly,
# test_tool_call_with_constrain_marker_adjacent, test_tool_call_with_channel_before_recipient_and_constrain_adjacent)
@pytest.mark.parametrize(
    "text",
    [
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"location": "Tokyo"}<|call|>',
        "<|start|>assistant to=functions.get_weather<|channel|>commentary"
        ' <|constrain|>json<|message|>{"location": "Tokyo"}<|call|>',
        "<|start|>assistant to=functions.get_weather<|channel|>commentary"
        '<|constrain|>json<|message|>{"location": "Tokyo"}<|call|>',
        "<|start|>assistant<|channel|>commentary to=functions.get_weather"
        '<|constrain|>json<|message|>{"location": "Tokyo"}<|call|>',
    ],
)
def test_tool_call_header_forms(tokenizer, text):
    parser = StreamParser(tokenizer, role=None)
    for token_id in tokenizer.encode(text, allowed_special="all"):
        parser.process(token_id)
    assert parser.stopped
    expected = Message(
        "assistant",
        '{"location": "Tokyo"}',
        channel="commentary",
        recipient="functions.get_weather",
        content_type="<|constrain|>json",
    )
    assert list(parser.messages) == [expected]
    # Rendered back, a tool call ends with <|call|> and keeps <|constrain|> a special token.
    assert render_conversation([expected]) == (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary"
        ' <|constrain|>json<|message|>{"location": "Tokyo"}<|call|>'
    )


def test_recipient_without_to_prefix(tokenizer):
    # openai/harmony's parser (src/encoding.rs) reads a lone word after the channel as the recipient.
    text = "<|start|>assistant<|channel|>analysis python<|message|>print(1 + 1)<|call|>"
    messages = parse_completion(tokenizer.encode(text, allowed_special="all"), tokenizer, role=None)
    assert messages == [Message("assistant", "print(1 + 1)", channel="analysis", recipient="python")]


def test_header_may_repeat_the_role_the_prompt_began(tokenizer):
    tokens = tokenizer.encode("assistant<|channel|>final<|message|>hi<|return|>", allowed_special="all")
    assert parse_completion(tokens, tokenizer) == [Message("assistant", "hi", channel="final")]


def test_tool_result_parsing(tokenizer):
    # openai/harmony test-data/test_tool_response_parsing.txt (its trailing space is message text)
    text = '<|start|>browser.search to=assistant<|channel|>commentary<|message|>{"result": "https://openai.com/"} '
    messages = parse_completion(tokenizer.encode(text, allowed_special="all"), tokenizer, role=None)
    assert messages == [
        Message(
            "tool",
            '{"result": "https://openai.com/"} ',
            name="browser.search",
            channel="commentary",
            recipient="assistant",
        )
    ]


def test_streaming_reports_header_fields_and_content_deltas(tokenizer):
    text = (
        "<|channel|>analysis<|message|>Think: 😊 first.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Grüße 👋🏾!<|return|>"
    )
    parser = StreamParser(tokenizer)
    deltas: dict[str | None, list[str]] = {}
    for token_id in tokenizer.encode(text, allowed_special="all"):
        delta = parser.process(token_id)
        assert delta == parser.last_content_delta
        assert "\ufffd" not in delta  # a character split over tokens appears once, complete
        if delta:
            assert parser.current_role is Role.ASSISTANT
            deltas.setdefault(parser.current_channel, []).append(delta)
            assert parser.current_content.endswith(delta)
    assert {channel: "".join(parts) for channel, parts in deltas.items()} == {
        "analysis": "Think: 😊 first.",
        "final": "Grüße 👋🏾!",
    }
    assert parser.stopped
    assert [m.content for m in parser.messages] == ["Think: 😊 first.", "Grüße 👋🏾!"]


def test_parser_state_follows_header_content_and_message_end(tokenizer):
    parser = StreamParser(tokenizer)
    assert parser.state is StreamState.HEADER  # the prompt ended in <|start|>assistant
    pieces = ["<|channel|>final", "<|message|>", "Hi", "<|end|>", "<|start|>"]
    states = []
    for piece in pieces:
        for token_id in tokenizer.encode(piece, allowed_special="all"):
            parser.process(token_id)
        states.append(parser.state)
    assert states == [
        StreamState.HEADER, StreamState.CONTENT, StreamState.CONTENT, StreamState.EXPECT_START, StreamState.HEADER
    ]
    assert StreamParser(tokenizer, role=None).state is StreamState.EXPECT_START


def test_streaming_reports_recipient_and_content_type_while_reading_content(tokenizer):
    parser = StreamParser(tokenizer)
    for token_id in tokenizer.encode(
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{", allowed_special="all"
    ):
        parser.process(token_id)
    assert parser.current_channel == "commentary"
    assert parser.current_recipient == "functions.get_weather"
    assert parser.current_content_type == "<|constrain|>json"
    assert parser.current_content == "{"
    assert not parser.messages


def test_invalid_utf8_becomes_the_replacement_character(tokenizer):
    emoji = tokenizer.encode("😊")
    assert len(emoji) == 4  # one token per byte in the demo vocabulary
    prefix = tokenizer.encode("<|start|>assistant<|message|>", allowed_special="all")
    # A truncated 4-byte sequence followed by text, then a truncated one at the very end.
    tokens = prefix + emoji[:2] + tokenizer.encode("XY") + emoji[:3]
    messages = parse_completion(tokens, tokenizer, role=None)
    assert messages == [Message("assistant", "\ufffdXY\ufffd")]


def test_stop_tokens_are_return_and_call_not_end(tokenizer):
    stops = stop_token_ids(tokenizer)
    assert stops == {tokenizer.special_token_id("<|return|>"), tokenizer.special_token_id("<|call|>")}
    assert tokenizer.special_token_id("<|end|>") not in stops

    parser = StreamParser(tokenizer)
    for token_id in tokenizer.encode("<|channel|>analysis<|message|>hm<|end|>", allowed_special="all"):
        parser.process(token_id)
    assert not parser.stopped  # <|end|> ends the analysis message, not the generation
    assert len(parser.messages) == 1


def test_stored_history_ends_the_final_answer_with_end_not_return(tokenizer):
    history = Conversation([Message("user", "Hi")])
    generated = tokenizer.encode("<|channel|>final<|message|>Hello!<|return|>", allowed_special="all")
    history = history.extended(parse_completion(generated, tokenizer))
    rendered = render_for_completion(history.extended([Message("user", "Bye")]))
    assert rendered == (
        "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|end|>"
        "<|start|>user<|message|>Bye<|end|><|start|>assistant"
    )


def test_eos_finishes_a_message_cut_off_by_a_token_limit(tokenizer):
    parser = StreamParser(tokenizer)
    for token_id in tokenizer.encode("<|channel|>final<|message|>The answer is", allowed_special="all"):
        parser.process(token_id)
    assert not parser.messages
    parser.process_eos()
    assert list(parser.messages) == [Message("assistant", "The answer is", channel="final")]
    assert not parser.stopped


# openai/harmony tests/test_harmony.py, test_streamable_parser_missing_message_token*: a header
# that never reaches <|message|> is an error in strict mode; lenient parsing keeps its text.
MISSING_MESSAGE_TOKEN_CASES = [
    (
        "I must refuse<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>We must refuse<|end|>"
        "<|start|>assistant<|channel|>final<|message|>I'm sorry, but I can't help with that.<|return|>",
        [
            Message("assistant", "I must refuse"),
            Message("assistant", "We must refuse", channel="analysis"),
            Message("assistant", "I'm sorry, but I can't help with that.", channel="final"),
        ],
    ),
    (
        "<|channel|>analysis I must refuse<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>We must refuse<|end|>"
        "<|start|>assistant<|channel|>final<|message|>I'm sorry, but I can't help with that.<|return|>",
        [
            Message("assistant", "I must refuse", channel="analysis"),
            Message("assistant", "We must refuse", channel="analysis"),
            Message("assistant", "I'm sorry, but I can't help with that.", channel="final"),
        ],
    ),
    (
        "... Let's use the tool.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json"
        '<|message|>{"location": "Tokyo"}<|call|>',
        [
            Message("assistant", "... Let's use the tool."),
            Message(
                "assistant",
                '{"location": "Tokyo"}',
                channel="commentary",
                recipient="functions.get_weather",
                content_type="json",
            ),
        ],
    ),
]


@pytest.mark.parametrize(("text", "lenient_messages"), MISSING_MESSAGE_TOKEN_CASES)
def test_missing_message_token(tokenizer, text, lenient_messages):
    tokens = tokenizer.encode(text, allowed_special="all")
    with pytest.raises(HarmonyParseError, match="before its header"):
        parse_completion(tokens, tokenizer)
    assert parse_completion(tokens, tokenizer, strict=False) == lenient_messages


def test_strict_parser_rejects_malformed_streams(tokenizer):
    with pytest.raises(HarmonyParseError, match="expected <\\|start\\|>"):
        parse_completion(tokenizer.encode("hello"), tokenizer, role=None)
    with pytest.raises(HarmonyParseError, match="before its header"):
        parse_completion(tokenizer.encode("<|channel|>final", allowed_special="all"), tokenizer)
    with pytest.raises(HarmonyParseError, match="unexpected words"):
        parse_completion(tokenizer.encode("<|channel|>final a b c<|message|>x", allowed_special="all"), tokenizer)
    with pytest.raises(HarmonyParseError, match="no channel name"):
        parse_completion(tokenizer.encode("<|channel|> final<|message|>x", allowed_special="all"), tokenizer)


def test_lenient_parser_keeps_unreadable_text_as_content(tokenizer):
    assert parse_completion(tokenizer.encode("hello"), tokenizer, role=None, strict=False) == [
        Message("assistant", "hello")
    ]
    cut_header = tokenizer.encode("<|channel|>final The answer", allowed_special="all")
    assert parse_completion(cut_header, tokenizer, strict=False) == [
        Message("assistant", "The answer", channel="final")
    ]
    bad_header = tokenizer.encode("<|channel|>final a b c<|message|>x", allowed_special="all")
    assert parse_completion(bad_header, tokenizer, strict=False) == [
        Message("assistant", "a b cx", channel="final")
    ]
    cut_user_header = tokenizer.encode("<|start|>user:bob Hello<|end|>", allowed_special="all")
    assert parse_completion(cut_user_header, tokenizer, role=None, strict=False) == [
        Message("user", "Hello", name="bob")
    ]
    repeated_stop = tokenizer.encode("<|channel|>final<|message|>x<|return|><|return|>", allowed_special="all")
    assert parse_completion(repeated_stop, tokenizer, strict=False) == [Message("assistant", "x", channel="final")]


def test_lenient_parser_accepts_any_token_stream(tokenizer):
    # What a randomly initialised demo model emits: any id, special tokens included.
    rng = random.Random(0)
    specials = list(tokenizer.special_tokens.values())
    for _ in range(20):
        tokens = [rng.choice(specials) if rng.random() < 0.2 else rng.randrange(tokenizer.vocab_size) for _ in range(60)]
        parser = StreamParser(tokenizer, strict=False)
        for token_id in tokens:
            parser.process(token_id)
        parser.process_eos()
        assert all(message.role in Role for message in parser.messages)


def test_parser_reads_reserved_ids_that_hugging_faces_tokenizer_json_lacks():
    # gpt-oss can sample ids 200019..201087, which HF's tokenizer.json does not list.
    tokenizer = hugging_face_like_tokenizer()
    reserved = [200019, 201087]
    generated = [
        *tokenizer.encode("<|channel|>final<|message|>x", allowed_special="all"), *reserved,
        *tokenizer.encode("y<|return|>", allowed_special="all"),
    ]
    assert parse_completion(generated, tokenizer) == [
        Message("assistant", "x<|reserved_200019|><|reserved_201087|>y", channel="final")
    ]
    with pytest.raises(HarmonyParseError, match=r"got token 200500 \('<\|reserved_200500\|>'\)"):
        parse_completion([200500], tokenizer, role=None)
    # Lenient parsing (the CLI's) of reserved ids everywhere: in headers, content, between messages.
    rng = random.Random(0)
    control = [tokenizer.special_token_id(name) for name in ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")]
    for _ in range(20):
        tokens = [rng.choice([rng.choice(control), rng.randrange(200019, 201088), rng.randrange(1000)])
                  for _ in range(60)]
        assert all(message.role in Role for message in parse_completion(tokens, tokenizer, role=None, strict=False))


def test_lenient_parser_streams_text_written_without_a_header_as_content(tokenizer):
    # What a random-weight model writes after <|start|>assistant: no channel, no <|message|>.
    parser = StreamParser(tokenizer, strict=False)
    deltas = [parser.process(token) for token in tokenizer.encode("Hello there, friend")]
    assert "".join(deltas) == "Hello there, friend" and parser.misplaced
    assert parser.state is StreamState.CONTENT and parser.current_channel is None
    assert deltas[-1]  # each token's text comes as it is read, not at the end
    header = StreamParser(tokenizer, strict=False)
    for token in tokenizer.encode("<|channel|>analysis", allowed_special="all"):
        assert header.process(token) == ""  # a header in progress is no content
    assert header.state is StreamState.HEADER and not header.misplaced
