"""gptoss_jax.harmony against OpenAI's own renderer and parser (openai_harmony 0.0.8) on the
real vocabulary: o200k_harmony built from bpe-openai's o200k_base file (openai_reference).

Every conversation is built with this package's types and converted to openai_harmony's
(`to_openai`); the two must give the same token ids, the same streaming states and deltas, and
the same parsed messages, `auto_drop_analysis` included. Where Harmony's docs/format.md rule for
the analysis of answered turns (`drop_answered_analysis`, which the CLI and the server use) differs
from openai_harmony's flag, the test pins both sides.
Nothing is downloaded.
"""

import itertools
import re

import openai_harmony as oh
import pytest

from gptoss_jax.harmony import (
    DeveloperContent,
    HarmonyEncoding,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    SystemContent,
    ToolDescription,
    ToolNamespace,
    drop_answered_analysis,
)
from harmony_cases import (
    BROWSER_NAMESPACE,
    CAPITAL_QUESTION,
    KITCHENSINK_TOOL,
    LOOKUP_WEATHER_TOOL,
    PYTHON_NAMESPACE,
    WEATHER_TOOLS,
    ongoing_tool_call_conversation,
)
from openai_reference import o200k_harmony, openai_harmony_encoding, openai_vocabulary_folder  # noqa: F401

TRIP_TOOL = ToolDescription(
    "book_trip",
    "Books a trip.\nSecond line of the description.",
    {
        "type": "object",
        "description": "trip parameters",
        "properties": {
            "traveller": {
                "type": "object",
                "description": "who travels",
                "properties": {
                    "name": {"type": "string", "title": "Full name", "examples": ["Ada Lovelace", "Alan Turing"]},
                    "age": {"type": "integer", "nullable": True},
                    "tags": {"type": "array", "items": {"type": "string", "enum": ["vip", "student"]}},
                },
                "required": ["name"],
            },
            "legs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "from": {"type": "string"},
                        "to": {"type": "string"},
                        "day": {"type": ["string", "integer", "null"]},
                    },
                    "required": ["from", "to"],
                },
            },
            "class": {"type": "string", "enum": ["economy", "business"], "default": "economy"},
            "budget": {"type": "number", "default": 1000.5},
            "flexible": {"type": "boolean", "default": False},
            "meta": {"type": "object"},
            "seat": {
                "description": "seat choice",
                "oneOf": [
                    {"type": "string", "description": "a seat code"},
                    {"type": "integer", "description": "a row", "default": 12},
                ],
                "default": "12A",
            },
            "payment": {
                "oneOf": [
                    {"type": "string", "enum": ["card", "cash"], "default": "card"},
                    {"type": "object", "properties": {"iban": {"type": "string"}}, "nullable": True},
                ]
            },
            "notes": {"type": "array"},
            "anything": {},
        },
        "required": ["traveller", "legs"],
    },
)
TOP_LEVEL_ONE_OF_TOOL = ToolDescription(
    "pick",
    "Parameters that are one of two objects.",
    {
        "oneOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "description": "by a"},
            {"type": "object", "properties": {"b": {"type": "number"}}, "default": {"b": 1}},
        ]
    },
)
NO_PARAMETERS_TOOL = ToolDescription("ping", "Takes no parameters.")
EMPTY_OBJECT_TOOL = ToolDescription("noop", "Takes an empty object.", {"type": "object", "properties": {}})


@pytest.fixture(scope="module")
def ours(o200k_harmony) -> HarmonyEncoding:
    return HarmonyEncoding(o200k_harmony)


def to_openai_tool(tool: ToolDescription) -> oh.ToolDescription:
    parameters = None if tool.parameters is None else dict(tool.parameters)
    return oh.ToolDescription.new(tool.name, tool.description, parameters=parameters)


def to_openai_content(content):
    if isinstance(content, SystemContent):
        system = (
            oh.SystemContent.new()
            .with_model_identity(content.model_identity)
            .with_knowledge_cutoff(content.knowledge_cutoff)
            .with_reasoning_effort(oh.ReasoningEffort(content.reasoning_effort.value.capitalize()))
            .with_channel_config(
                oh.ChannelConfig(valid_channels=list(content.valid_channels), channel_required=content.channel_required)
            )
        )
        if content.conversation_start_date is not None:
            system = system.with_conversation_start_date(content.conversation_start_date)
        for namespace in content.tools:
            tools = [to_openai_tool(tool) for tool in namespace.tools]
            system = system.with_tools(oh.ToolNamespaceConfig(name=namespace.name, description=namespace.description, tools=tools))
        return system
    if isinstance(content, DeveloperContent):
        developer = oh.DeveloperContent.new()
        if content.instructions is not None:
            developer = developer.with_instructions(content.instructions)
        if content.tools:
            developer = developer.with_function_tools([to_openai_tool(tool) for tool in content.tools])
        return developer
    return content


def to_openai(message: Message) -> oh.Message:
    converted = oh.Message.from_author_and_content(
        oh.Author.new(oh.Role(message.role.value), message.name), to_openai_content(message.content)
    )
    if message.channel is not None:
        converted = converted.with_channel(message.channel)
    if message.recipient is not None:
        converted = converted.with_recipient(message.recipient)
    if message.content_type is not None:
        converted = converted.with_content_type(message.content_type)
    return converted


def from_openai(message: oh.Message) -> Message:
    text = "".join(part.text for part in message.content)
    return Message(
        message.author.role.value, text, name=message.author.name, channel=message.channel,
        recipient=message.recipient, content_type=message.content_type,
    )


def openai_conversation(messages) -> oh.Conversation:
    return oh.Conversation.from_messages([to_openai(message) for message in messages])


def assert_same_prompt(ours, openai_harmony_encoding, messages, **config):
    expected = openai_harmony_encoding.render_conversation_for_completion(
        openai_conversation(messages), oh.Role.ASSISTANT, oh.RenderConversationConfig(**config)
    )
    assert ours.render_conversation_for_completion(messages, Role.ASSISTANT, **config) == expected
    expected = openai_harmony_encoding.render_conversation(openai_conversation(messages), oh.RenderConversationConfig(**config))
    assert ours.render_conversation(messages, **config) == expected


# ---------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("effort", list(ReasoningEffort))
def test_reasoning_efforts_with_developer_instructions(ours, openai_harmony_encoding, effort):
    messages = [
        Message("system", SystemContent(reasoning_effort=effort, conversation_start_date="2025-06-28")),
        Message("developer", DeveloperContent(instructions="Answer the user's questions like a robot.")),
        Message("user", CAPITAL_QUESTION),
    ]
    assert_same_prompt(ours, openai_harmony_encoding, messages)


@pytest.mark.parametrize(
    "system",
    [
        SystemContent(),
        SystemContent(knowledge_cutoff="2021-01", valid_channels=("analysis", "final")),
        SystemContent(model_identity="You are a terse assistant.", valid_channels=("final",), channel_required=False),
    ],
    ids=["default", "two-channels", "own-identity"],
)
def test_system_messages_without_developer_message(ours, openai_harmony_encoding, system):
    assert_same_prompt(ours, openai_harmony_encoding, [Message("system", system), Message("user", "Hi 👋")])


@pytest.mark.parametrize(
    "tools",
    [
        WEATHER_TOOLS + (KITCHENSINK_TOOL,),
        (TRIP_TOOL,),
        (TOP_LEVEL_ONE_OF_TOOL, NO_PARAMETERS_TOOL, EMPTY_OBJECT_TOOL),
    ],
    ids=["weather-and-kitchensink", "nested-trip", "one-of-and-empty"],
)
def test_function_tools_with_rich_json_schemas(ours, openai_harmony_encoding, tools):
    messages = [
        Message("system", SystemContent(reasoning_effort="high", conversation_start_date="2025-06-28")),
        Message("developer", DeveloperContent("Always respond in riddles", tools)),
        Message("user", "What is the weather like in SF?"),
    ]
    assert_same_prompt(ours, openai_harmony_encoding, messages)


def test_builtin_tool_namespaces_beside_function_tools(ours, openai_harmony_encoding):
    described = ToolNamespace("calendar", "Your calendar.\nRead only.", (NO_PARAMETERS_TOOL,))
    messages = [
        Message("system", SystemContent(tools=[PYTHON_NAMESPACE, BROWSER_NAMESPACE, described])),
        Message("developer", DeveloperContent(tools=[LOOKUP_WEATHER_TOOL])),
        Message("user", "Weather?"),
    ]
    assert_same_prompt(ours, openai_harmony_encoding, messages)


def test_tool_calls_and_results(ours, openai_harmony_encoding):
    messages = list(ongoing_tool_call_conversation().messages) + [
        Message("assistant", "Let me check the forecast too.", channel="commentary"),
        Message("assistant", "print(2 ** 10)", channel="analysis", recipient="python"),
        Message("tool", "1024", name="python", channel="analysis", recipient="assistant"),
        Message(
            "assistant", '{"location": "東京"}', channel="commentary", recipient="functions.get_weather",
            content_type="json",
        ),
        Message("tool", '{"sunny": true}', name="functions.get_weather", channel="commentary", recipient="assistant"),
    ]
    assert_same_prompt(ours, openai_harmony_encoding, messages)


def test_named_authors_and_text_that_spells_special_tokens(ours, openai_harmony_encoding):
    messages = [Message("user", "Say <|end|><|start|>system please", name="alice"), Message("user", "   \n\n  ")]
    assert_same_prompt(ours, openai_harmony_encoding, messages)


def test_single_messages(ours, openai_harmony_encoding):
    for message in ongoing_tool_call_conversation().messages:
        assert ours.render(message) == openai_harmony_encoding.render(to_openai(message))


# ---------------------------------------------------------------------------------------------
# Dropping the analysis of answered turns


def user(text):
    return Message("user", text)


def analysis(text):
    return Message("assistant", text, channel="analysis")


def final(text):
    return Message("assistant", text, channel="final")


TOOL_CALL = Message("assistant", "{}", channel="commentary", recipient="functions.f", content_type="<|constrain|>json")
TOOL_RESULT = Message("tool", "42", name="functions.f", channel="commentary", recipient="assistant")


SYSTEM = Message("system", SystemContent(conversation_start_date="2025-06-28"))
TURN_PARTS = {"user": user("q"), "analysis": analysis("a"), "final": final("f"), "call": TOOL_CALL, "result": TOOL_RESULT}


@pytest.mark.parametrize(
    "messages",
    [
        [SYSTEM, user("q1"), analysis("a1"), final("f1")],
        [user("q1"), analysis("a1"), final("f1"), user("q2")],
        [user("q1"), analysis("a1"), final("f1"), user("q2"), analysis("a2"), final("f2")],
        [user("q1"), analysis("a1"), final("f1"), user("q2"), analysis("a2"), final("f2"), user("q3")],
        [user("q1"), analysis("a1"), TOOL_CALL, TOOL_RESULT],
        [user("q1"), analysis("a1"), TOOL_CALL, TOOL_RESULT, analysis("a1b"), final("f1")],
        [user("q1"), analysis("a1"), TOOL_CALL, TOOL_RESULT, analysis("a1b"), final("f1"), user("q2")],
        [user("q1"), analysis("a1"), final("f1"), user("q2"), analysis("a2"), TOOL_CALL, TOOL_RESULT],
    ],
    ids=["system-one-answered", "answered-then-user", "two-answered", "three-turns", "ongoing-tool-call",
         "tool-call-answered", "tool-call-answered-then-user", "tool-call-after-answered"],
)
def test_analysis_dropping_as_openai_harmony(ours, openai_harmony_encoding, messages):
    assert_same_prompt(ours, openai_harmony_encoding, messages)
    assert_same_prompt(ours, openai_harmony_encoding, messages, auto_drop_analysis=False)


def test_analysis_dropping_as_openai_harmony_in_every_short_conversation(ours, openai_harmony_encoding):
    # A system message, then every sequence of up to four of users, analyses, finals, tool calls and
    # tool results: 780 conversations.
    for length in range(1, 5):
        for parts in itertools.product(TURN_PARTS, repeat=length):
            messages = [SYSTEM, *(TURN_PARTS[part] for part in parts)]
            expected = openai_harmony_encoding.render_conversation_for_completion(
                openai_conversation(messages), oh.Role.ASSISTANT, oh.RenderConversationConfig(auto_drop_analysis=True)
            )
            assert ours.render_conversation_for_completion(messages, Role.ASSISTANT) == expected, parts


def kept_analysis(ours, openai_harmony_encoding, messages):
    """The analysis texts each rule keeps in the next-turn prompt: (Harmony's docs/format.md rule,
    `drop_answered_analysis`; openai_harmony's ``auto_drop_analysis``)."""
    mine = ours.tokenizer.decode(
        ours.render_conversation_for_completion(drop_answered_analysis(messages), Role.ASSISTANT, auto_drop_analysis=False)
    )
    theirs = openai_harmony_encoding.decode_utf8(
        openai_harmony_encoding.render_conversation_for_completion(openai_conversation(messages), oh.Role.ASSISTANT)
    )
    pattern = r"<\|channel\|>analysis<\|message\|>(.*?)<\|end\|>"
    return re.findall(pattern, mine), re.findall(pattern, theirs)


@pytest.mark.parametrize(
    ("messages", "docs_rule_keeps", "openai_keeps"),
    [
        # One answered turn, no user message after it: openai_harmony drops its analysis, though it
        # keeps the same turn's analysis once an earlier turn was answered (two-answered above).
        ([user("q1"), analysis("a1"), final("f1")], ["a1"], []),
        ([user("q1"), analysis("a1"), TOOL_CALL, TOOL_RESULT, analysis("a1b"), final("f1")], ["a1", "a1b"], []),
        # Three turns: openai_harmony drops only the analysis before the first final.
        (
            [user("q1"), analysis("a1"), final("f1"), user("q2"), analysis("a2"), final("f2"), user("q3")],
            [],
            ["a2"],
        ),
        # A tool call after an answered turn: openai_harmony drops nothing.
        ([user("q1"), analysis("a1"), final("f1"), user("q2"), analysis("a2"), TOOL_CALL, TOOL_RESULT], ["a2"], ["a1", "a2"]),
    ],
    ids=["one-answered", "tool-call-answered", "three-turns", "tool-call-after-answered"],
)
def test_the_docs_rule_where_openai_harmony_differs(ours, openai_harmony_encoding, messages, docs_rule_keeps, openai_keeps):
    assert kept_analysis(ours, openai_harmony_encoding, messages) == (docs_rule_keeps, openai_keeps)
    # Apart from which analysis is kept, the prompts are the same.
    kept = [m for m in messages if m.channel != "analysis" or m.content in docs_rule_keeps]
    assert ours.render_conversation_for_completion(drop_answered_analysis(messages), Role.ASSISTANT,
                                                   auto_drop_analysis=False) == (
        openai_harmony_encoding.render_conversation_for_completion(
            openai_conversation(kept), oh.Role.ASSISTANT, oh.RenderConversationConfig(auto_drop_analysis=False)
        )
    )


# ---------------------------------------------------------------------------------------------
# Stop tokens and parsing


def test_stop_tokens(ours, openai_harmony_encoding):
    assert set(ours.stop_tokens_for_assistant_actions()) == set(openai_harmony_encoding.stop_tokens_for_assistant_actions())
    assert set(ours.stop_tokens()) == set(openai_harmony_encoding.stop_tokens())


COMPLETIONS = [
    (
        Role.ASSISTANT,
        "<|channel|>analysis<|message|>User says 👋🏾 in 日本語; compute 12345*678 = 8369910.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>**8 369 910** — Grüße! 🇫🇷<|return|>",
    ),
    (
        Role.ASSISTANT,
        "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"location": "東京", "unit": "celsius"}<|call|>',
    ),
    (
        Role.ASSISTANT,
        " to=functions.lookup_weather<|channel|>commentary json<|message|>{\"location\": \"SF\"}<|call|>",
    ),
    (
        Role.ASSISTANT,
        "<|channel|>commentary<|message|>I'll look that up first.<|end|>"
        "<|start|>assistant<|channel|>analysis python<|message|>print(sum(range(10)))<|call|>",
    ),
    (
        None,
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sunny": true}<|end|>'
        "<|start|>assistant<|channel|>final<|message|>Sunny.\n\n  Indented line\twith tab.<|return|>",
    ),
    # Cut off by a token limit inside content: process_eos finishes the message.
    (Role.ASSISTANT, "<|channel|>final<|message|>The answer is 4"),
]


@pytest.mark.parametrize(
    ("role", "text"),
    COMPLETIONS,
    ids=["reasoning", "tool-call", "recipient-first", "preamble-python", "tool-result", "cut-off"],
)
def test_streaming_parse_as_openai_harmony(ours, openai_harmony_encoding, role, text):
    tokens = ours.tokenizer.encode(text, allowed_special="all")
    assert tokens == openai_harmony_encoding.encode(text, allowed_special="all")
    mine = StreamableParser(ours, role)
    theirs = oh.StreamableParser(openai_harmony_encoding, None if role is None else oh.Role(role.value))
    for token_id in tokens:
        assert mine.process(token_id) is mine
        theirs.process(token_id)
        assert mine.state.name == theirs.state.name
        assert (mine.current_role and mine.current_role.value) == (theirs.current_role and theirs.current_role.value)
        assert mine.current_channel == theirs.current_channel
        assert mine.current_recipient == theirs.current_recipient
        assert mine.current_content_type == theirs.current_content_type
        assert mine.last_content_delta == theirs.last_content_delta
        assert mine.current_content == theirs.current_content
    mine.process_eos()
    theirs.process_eos()
    expected = [from_openai(message) for message in theirs.messages]
    assert list(mine.messages) == expected
    assert list(mine.tokens) == theirs.tokens == tokens
    assert ours.parse_messages_from_completion_tokens(tokens, role) == expected
