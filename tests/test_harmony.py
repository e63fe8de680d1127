"""Tests for gptoss_jax.harmony: rendering against the strings the Harmony format documents,
token encoding, the streaming parser, stop tokens and bad input.

Expected strings are copied verbatim from github.com/openai/harmony (commit ec7606d, v0.0.8):
the renderer's `test-data/*.txt` files (each named above its literal) and `docs/format.md`.
The tokenizer is the demo one, built on the spot; nothing is downloaded.
"""

import datetime
import random

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from gptoss_jax.harmony import (
    Conversation,
    DeveloperContent,
    HarmonyParseError,
    Message,
    ReasoningEffort,
    Role,
    StreamParser,
    SystemContent,
    ToolDescription,
    ToolNamespace,
    encode_conversation,
    encode_for_completion,
    parse_completion,
    render_conversation,
    render_for_completion,
    stop_token_ids,
)
from gptoss_jax.tokenizer import Tokenizer, build_demo_tokenizer
from test_tokenizer import hugging_face_like_tokenizer

# openai/harmony test-data/test_simple_convo_low_effort.txt
SIMPLE_CONVO_LOW_EFFORT = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06

Reasoning: low

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|><|start|>developer<|message|># Instructions

Answer the user's questions like a robot.<|end|><|start|>user<|message|>What is the capital of the largest country in the world?<|end|><|start|>assistant"""

# openai/harmony test-data/test_simple_convo_high_effort_no_instruction.txt
SIMPLE_CONVO_HIGH_EFFORT_NO_INSTRUCTION = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06

Reasoning: high

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|><|start|>user<|message|>What is the capital of the largest country in the world?<|end|><|start|>assistant"""

# openai/harmony test-data/test_reasoning_system_message_with_dates.txt
REASONING_SYSTEM_MESSAGE_WITH_DATES = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2021-01
Current date: 2021-01-01

Reasoning: medium

# Valid channels: analysis, final. Channel must be included for every message.<|end|><|start|>user<|message|>What is 42 * pi?<|end|><|start|>assistant"""

# openai/harmony test-data/test_no_tools.txt
NO_TOOLS = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-06-28

Reasoning: medium

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|><|start|>assistant"""

# openai/harmony test-data/test_render_functions_with_parameters.txt
RENDER_FUNCTIONS_WITH_PARAMETERS = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-06-28

Reasoning: high

# Valid channels: analysis, commentary, final. Channel must be included for every message.
Calls to these tools must go to the commentary channel: 'functions'.<|end|><|start|>developer<|message|># Instructions

Always respond in riddles

# Tools

## functions

namespace functions {

// Gets the location of the user.
type get_location = () => any;

// Gets the current weather in the provided location.
type get_current_weather = (_: {
// The city and state, e.g. San Francisco, CA
location: string,
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

// Gets the current weather in the provided list of locations.
type get_multiple_weathers = (_: {
// List of city and state, e.g. ["San Francisco, CA", "New York, NY"]
locations: string[],
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

// A function with various complex schemas.
type kitchensink = (_: // params object
{
// STRING
//
// A string
// Examples:
// - "hello"
// - "world"
string?: string,
// A nullable string
string_nullable?: string | null, // default: "the default"
string_enum?: "a" | "b" | "c",
// a oneof
// default: 20
oneof_string_or_number?:
 | string // default: "default_string_in_oneof"
 | number // numbers can happen too
,
}) => any;

} // namespace functions<|end|><|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant"""

# openai/harmony test-data/test_browser_and_function_tool.txt
BROWSER_AND_FUNCTION_TOOL = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-06-28

Reasoning: medium

# Tools

## browser

// Tool for browsing.
// The `cursor` appears in brackets before each browsing display: `[{cursor}]`.
// Cite information from the tool using the following format:
// `【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.
// Do not quote more than 10 words directly from the tool output.
// sources=web (default: web)
namespace browser {

// Searches for information related to `query` and displays `topn` results.
type search = (_: {
query: string,
topn?: number, // default: 10
source?: string,
}) => any;

// Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing `num_lines` lines.
// Valid link ids are displayed with the formatting: `【{id}†.*】`.
// If `cursor` is not provided, the most recent page is implied.
// If `id` is a string, it is treated as a fully qualified URL associated with `source`.
// If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most relevant passage, if available.
// Use this function without `id` to scroll to a new location of an opened page.
type open = (_: {
id?: number | string, // default: -1
cursor?: number, // default: -1
loc?: number, // default: -1
num_lines?: number, // default: -1
view_source?: boolean, // default: false
source?: string,
}) => any;

// Finds exact matches of `pattern` in the current page, or the page given by `cursor`.
type find = (_: {
pattern: string,
cursor?: number, // default: -1
}) => any;

} // namespace browser

# Valid channels: analysis, commentary, final. Channel must be included for every message.
Calls to these tools must go to the commentary channel: 'functions'.<|end|><|start|>developer<|message|># Tools

## functions

namespace functions {

// Use this tool to lookup the weather in a given location. Call it with the parameter 'location', can be any textual description of a location.
type lookup_weather = (_: {
location: string,
}) => any;

} // namespace functions<|end|><|start|>assistant"""

# openai/harmony test-data/test_browser_and_python_tool.txt
BROWSER_AND_PYTHON_TOOL = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-06-28

Reasoning: medium

# Tools

## browser

// Tool for browsing.
// The `cursor` appears in brackets before each browsing display: `[{cursor}]`.
// Cite information from the tool using the following format:
// `【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.
// Do not quote more than 10 words directly from the tool output.
// sources=web (default: web)
namespace browser {

// Searches for information related to `query` and displays `topn` results.
type search = (_: {
query: string,
topn?: number, // default: 10
source?: string,
}) => any;

// Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing `num_lines` lines.
// Valid link ids are displayed with the formatting: `【{id}†.*】`.
// If `cursor` is not provided, the most recent page is implied.
// If `id` is a string, it is treated as a fully qualified URL associated with `source`.
// If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most relevant passage, if available.
// Use this function without `id` to scroll to a new location of an opened page.
type open = (_: {
id?: number | string, // default: -1
cursor?: number, // default: -1
loc?: number, // default: -1
num_lines?: number, // default: -1
view_source?: boolean, // default: false
source?: string,
}) => any;

// Finds exact matches of `pattern` in the current page, or the page given by `cursor`.
type find = (_: {
pattern: string,
cursor?: number, // default: -1
}) => any;

} // namespace browser

## python

Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. This tool should be used for internal reasoning, but not for code that is intended to be visible to the user (e.g. when creating plots, tables, or files).

When you send a message containing Python code to python, it will be executed in a stateful Jupyter notebook environment. python will respond with the output of the execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this session is UNKNOWN. Depends on the cluster.

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|><|start|>assistant"""

# openai/harmony test-data/test_dropping_cot_by_default.txt
DROPPING_COT_BY_DEFAULT = (
    '<|start|>user<|message|>What is 2 + 2?<|end|>'
    '<|start|>assistant<|channel|>final<|message|>2 + 2 equals 4.<|end|>'
    '<|start|>user<|message|>What about 9 / 2?<|end|>'
    '<|start|>assistant'
)

# openai/harmony test-data/test_preserve_cot.txt
PRESERVE_COT = (
    '<|start|>user<|message|>What is 2 + 2?<|end|>'
    '<|start|>assistant<|channel|>analysis<|message|>User asks a simple question: "What is 2 + 2?" The answer: 4.<|end|>'
    '<|start|>assistant<|channel|>final<|message|>2 + 2 equals 4.<|end|>'
    '<|start|>user<|message|>What about 9 / 2?<|end|>'
    '<|start|>assistant'
)

# openai/harmony test-data/test_keep_analysis_between_finals.txt
KEEP_ANALYSIS_BETWEEN_FINALS = (
    '<|start|>user<|message|>What is 2 + 2?<|end|>'
    '<|start|>assistant<|channel|>final<|message|>4<|end|>'
    '<|start|>user<|message|>What is 3 + 5?<|end|>'
    '<|start|>assistant<|channel|>analysis<|message|>thinking 3+5<|end|>'
    '<|start|>assistant<|channel|>final<|message|>8<|end|>'
)

# openai/harmony test-data/test_does_not_drop_if_ongoing_analysis.txt
DOES_NOT_DROP_IF_ONGOING_ANALYSIS = (
    '<|start|>user<|message|>What is the weather in SF?<|end|>'
    '<|start|>assistant<|channel|>analysis<|message|>User asks: “What is the weather in SF?” We need to use lookup_weather tool.<|end|>'
    '<|start|>assistant to=functions.lookup_weather<|channel|>commentary <|constrain|>json<|message|>{"location": "San Francisco"}<|call|>'
    '<|start|>functions.lookup_weather<|message|>{"temperature": 20, "description": "sunny"}<|end|>'
    '<|start|>assistant'
)

# openai/harmony docs/format.md, "Function calling": the complete input example
DOCS_FUNCTIONS_INPUT = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-06-28

Reasoning: high

# Valid channels: analysis, commentary, final. Channel must be included for every message.
Calls to these tools must go to the commentary channel: 'functions'.<|end|><|start|>developer<|message|># Instructions

Use a friendly tone.

# Tools

## functions

namespace functions {

// Gets the location of the user.
type get_location = () => any;

// Gets the current weather in the provided location.
type get_current_weather = (_: {
// The city and state, e.g. San Francisco, CA
location: string,
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

// Gets the current weather in the provided list of locations.
type get_multiple_weathers = (_: {
// List of city and state, e.g. ["San Francisco, CA", "New York, NY"]
locations: string[],
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

} // namespace functions<|end|><|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant"""

# openai/harmony docs/format.md, "Receiving tool calls" (model output) and "Handling tool calls"
DOCS_TOOL_CALL_OUTPUT = (
    "<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"location":"San Francisco"}<|call|>'
)
DOCS_TOOL_RESULT = (
    "<|start|>functions.get_weather to=assistant<|channel|>commentary"
    '<|message|>{"sunny": true, "temperature": 20}<|end|>'
)

# Inputs of the documented renderings, as openai/harmony's tests/test_harmony.py and
# src/chat.rs build them.
WEATHER_TOOLS = (
    ToolDescription("get_location", "Gets the location of the user."),
    ToolDescription(
        "get_current_weather",
        "Gets the current weather in the provided location.",
        {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["location"],
        },
    ),
    ToolDescription(
        "get_multiple_weathers",
        "Gets the current weather in the provided list of locations.",
        {
            "type": "object",
            "properties": {
                "locations": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": 'List of city and state, e.g. ["San Francisco, CA", "New York, NY"]',
                },
                "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["locations"],
        },
    ),
)
KITCHENSINK_TOOL = ToolDescription(
    "kitchensink",
    "A function with various complex schemas.",
    {
        "description": "params object",
        "type": "object",
        "properties": {
            "string": {"type": "string", "title": "STRING", "description": "A string", "examples": ["hello", "world"]},
            "string_nullable": {
                "type": "string",
                "nullable": True,
                "description": "A nullable string",
                "default": "the default",
            },
            "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
            "oneof_string_or_number": {
                "oneOf": [
                    {"type": "string", "default": "default_string_in_oneof"},
                    {"type": "number", "description": "numbers can happen too"},
                ],
                "description": "a oneof",
                "default": 20,
            },
        },
    },
)
BROWSER_NAMESPACE = ToolNamespace(
    "browser",
    "Tool for browsing.\n"
    "The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n"
    "Cite information from the tool using the following format:\n"
    "`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n"
    "Do not quote more than 10 words directly from the tool output.\n"
    "sources=web (default: web)",
    (
        ToolDescription(
            "search",
            "Searches for information related to `query` and displays `topn` results.",
            {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "topn": {"type": "number", "default": 10},
                    "source": {"type": "string"},
                },
                "required": ["query"],
            },
        ),
        ToolDescription(
            "open",
            "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, "
            "showing `num_lines` lines.\n"
            "Valid link ids are displayed with the formatting: `【{id}†.*】`.\n"
            "If `cursor` is not provided, the most recent page is implied.\n"
            "If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n"
            "If `loc` is not provided, the viewport will be positioned at the beginning of the document "
            "or centered on the most relevant passage, if available.\n"
            "Use this function without `id` to scroll to a new location of an opened page.",
            {
                "type": "object",
                "properties": {
                    "id": {"type": ["number", "string"], "default": -1},
                    "cursor": {"type": "number", "default": -1},
                    "loc": {"type": "number", "default": -1},
                    "num_lines": {"type": "number", "default": -1},
                    "view_source": {"type": "boolean", "default": False},
                    "source": {"type": "string"},
                },
            },
        ),
        ToolDescription(
            "find",
            "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
            {
                "type": "object",
                "properties": {"pattern": {"type": "string"}, "cursor": {"type": "number", "default": -1}},
                "required": ["pattern"],
            },
        ),
    ),
)
PYTHON_NAMESPACE = ToolNamespace(
    "python",
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the "
    "user. This tool should be used for internal reasoning, but not for code that is intended to be "
    "visible to the user (e.g. when creating plots, tables, or files).\n\n"
    "When you send a message containing Python code to python, it will be executed in a stateful "
    "Jupyter notebook environment. python will respond with the output of the execution or time out "
    "after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. "
    "Internet access for this session is UNKNOWN. Depends on the cluster.",
)
LOOKUP_WEATHER_TOOL = ToolDescription(
    "lookup_weather",
    "Use this tool to lookup the weather in a given location. Call it with the parameter 'location', "
    "can be any textual description of a location.",
    {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
)
CAPITAL_QUESTION = "What is the capital of the largest country in the world?"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_demo_tokenizer(1024)


def ongoing_tool_call_conversation() -> Conversation:
    return Conversation(
        [
            Message("user", "What is the weather in SF?"),
            Message(
                "assistant",
                "User asks: “What is the weather in SF?” We need to use lookup_weather tool.",
                channel="analysis",
            ),
            Message(
                "assistant",
                '{"location": "San Francisco"}',
                channel="commentary",
                recipient="functions.lookup_weather",
                content_type="<|constrain|>json",
            ),
            Message("tool", '{"temperature": 20, "description": "sunny"}', name="functions.lookup_weather"),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Rendering against the documented strings


def test_simple_conversation_with_low_effort_and_instructions():
    conversation = [
        Message("system", SystemContent(reasoning_effort=ReasoningEffort.LOW)),
        Message("developer", DeveloperContent(instructions="Answer the user's questions like a robot.")),
        Message("user", CAPITAL_QUESTION),
    ]
    assert render_for_completion(conversation) == SIMPLE_CONVO_LOW_EFFORT


def test_simple_conversation_with_high_effort_without_developer_message():
    conversation = [Message("system", SystemContent(reasoning_effort="high")), Message("user", CAPITAL_QUESTION)]
    assert render_for_completion(conversation) == SIMPLE_CONVO_HIGH_EFFORT_NO_INSTRUCTION


def test_system_message_with_dates_and_two_channels():
    system = SystemContent(
        knowledge_cutoff="2021-01",
        conversation_start_date="2021-01-01",
        valid_channels=("analysis", "final"),
    )
    conversation = [Message("system", system), Message("user", "What is 42 * pi?")]
    assert render_for_completion(conversation) == REASONING_SYSTEM_MESSAGE_WITH_DATES


def test_default_system_message_with_current_date():
    system = SystemContent(conversation_start_date=datetime.date(2025, 6, 28))
    assert system.conversation_start_date == "2025-06-28"
    assert render_for_completion([Message(Role.SYSTEM, system)]) == NO_TOOLS


def test_function_tools_with_parameters():
    conversation = [
        Message("system", SystemContent(reasoning_effort="high", conversation_start_date="2025-06-28")),
        Message("developer", DeveloperContent("Always respond in riddles", WEATHER_TOOLS + (KITCHENSINK_TOOL,))),
        Message("user", "What is the weather like in SF?"),
    ]
    assert render_for_completion(conversation) == RENDER_FUNCTIONS_WITH_PARAMETERS


def test_function_tools_docs_example():
    conversation = [
        Message("system", SystemContent(reasoning_effort="high", conversation_start_date="2025-06-28")),
        Message("developer", DeveloperContent("Use a friendly tone.", WEATHER_TOOLS)),
        Message("user", "What is the weather like in SF?"),
    ]
    assert render_for_completion(conversation) == DOCS_FUNCTIONS_INPUT


def test_builtin_browser_tool_with_function_tools():
    conversation = [
        Message("system", SystemContent(conversation_start_date="2025-06-28", tools=[BROWSER_NAMESPACE])),
        Message("developer", DeveloperContent(tools=[LOOKUP_WEATHER_TOOL])),
    ]
    assert render_for_completion(conversation) == BROWSER_AND_FUNCTION_TOOL


def test_builtin_browser_and_python_tools_sorted_by_name():
    system = SystemContent(conversation_start_date="2025-06-28", tools=[PYTHON_NAMESPACE, BROWSER_NAMESPACE])
    assert render_for_completion([Message("system", system)]) == BROWSER_AND_PYTHON_TOOL


def test_tool_call_and_tool_result_keep_the_analysis():
    assert render_for_completion(ongoing_tool_call_conversation()) == DOES_NOT_DROP_IF_ONGOING_ANALYSIS


def test_analysis_of_an_answered_turn_is_dropped():
    conversation = [
        Message("user", "What is 2 + 2?"),
        Message("assistant", "User asks: “What is 2 + 2?” Simple arithmetic. Provide answer.", channel="analysis"),
        Message("assistant", "2 + 2 equals 4.", channel="final"),
        Message("user", "What about 9 / 2?"),
    ]
    assert render_for_completion(conversation) == DROPPING_COT_BY_DEFAULT


def test_analysis_is_kept_when_auto_drop_is_off():
    conversation = [
        Message("user", "What is 2 + 2?"),
        Message("assistant", 'User asks a simple question: "What is 2 + 2?" The answer: 4.', channel="analysis"),
        Message("assistant", "2 + 2 equals 4.", channel="final"),
        Message("user", "What about 9 / 2?"),
    ]
    assert render_for_completion(conversation, auto_drop_analysis=False) == PRESERVE_COT


def test_analysis_of_the_last_turn_is_kept():
    conversation = [
        Message("user", "What is 2 + 2?"),
        Message("assistant", "thinking 2+2", channel="analysis"),
        Message("assistant", "4", channel="final"),
        Message("user", "What is 3 + 5?"),
        Message("assistant", "thinking 3+5", channel="analysis"),
        Message("assistant", "8", channel="final"),
    ]
    assert render_conversation(conversation) == KEEP_ANALYSIS_BETWEEN_FINALS


def test_analysis_of_every_answered_turn_is_dropped_from_the_third_turn_on():
    # Not in Harmony's test data: docs/format.md's rule ("drop any previous CoT content ... if the
    # responses by the assistant ended in a message to the final channel", but keep the CoT of a
    # turn still calling tools) applied to three turns.
    conversation = Conversation(
        [
            Message("user", "Q1"),
            Message("assistant", "think 1", channel="analysis"),
            Message("assistant", "A1", channel="final"),
            Message("user", "Q2"),
            Message("assistant", "think 2", channel="analysis"),
            Message("assistant", "A2", channel="final"),
            Message("user", "Q3"),
            Message("assistant", "think 3", channel="analysis"),
            Message("assistant", "{}", channel="commentary", recipient="functions.f", content_type="json"),
            Message("tool", "42", name="functions.f", channel="commentary", recipient="assistant"),
        ]
    )
    assert render_for_completion(conversation) == (
        "<|start|>user<|message|>Q1<|end|>"
        "<|start|>assistant<|channel|>final<|message|>A1<|end|>"
        "<|start|>user<|message|>Q2<|end|>"
        "<|start|>assistant<|channel|>final<|message|>A2<|end|>"
        "<|start|>user<|message|>Q3<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>think 3<|end|>"
        "<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}<|call|>"
        "<|start|>functions.f to=assistant<|channel|>commentary<|message|>42<|end|>"
        "<|start|>assistant"
    )


def test_docs_tool_call_continues_into_the_documented_follow_up_prompt(tokenizer):
    prompt = [
        Message("system", SystemContent(reasoning_effort="high", conversation_start_date="2025-06-28")),
        Message("developer", DeveloperContent("Use a friendly tone.", WEATHER_TOOLS)),
        Message("user", "What is the weather like in SF?"),
    ]
    generated = parse_completion(tokenizer.encode(DOCS_TOOL_CALL_OUTPUT, allowed_special="all"), tokenizer)
    tool_result = Message(
        "tool",
        '{"sunny": true, "temperature": 20}',
        name="functions.get_weather",
        channel="commentary",
        recipient="assistant",
    )
    assert render_conversation([tool_result]) == DOCS_TOOL_RESULT
    # format.md's follow-up prompt, with the tool call's recipient written before the channel, where
    # the renderer writes it (test_does_not_drop_if_ongoing_analysis.txt); the docs allow either.
    expected = (
        DOCS_FUNCTIONS_INPUT
        + "<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
        + "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        + '<|message|>{"location":"San Francisco"}<|call|>'
        + DOCS_TOOL_RESULT
        + "<|start|>assistant"
    )
    assert render_for_completion(prompt + generated + [tool_result]) == expected


def test_nested_schema_types():
    # Derived from src/encoding.rs (json_schema_to_typescript): integers are numbers, nested objects
    # indent by four spaces, an array without items is Array<any>, unknown types are any.
    # A oneOf below a property (here in array items) lists its variants on new lines, and there
    # a string default is written as JSON even for an enum. Description lines end at "\n" only,
    # dropping a "\r" before it.
    one_of_items = {
        "oneOf": [
            {"type": "string", "enum": ["a"], "default": "a"},
            {"type": "integer", "nullable": True, "description": "n"},
        ]
    }
    tool = ToolDescription(
        "f",
        "Nested.\r\nSecond line.\n",
        {
            "type": "object",
            "properties": {
                "count": {"type": "integer"},
                "point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
                "tags": {"type": "array"},
                "points": {"type": "array", "items": {"type": "object", "properties": {"y": {"type": "boolean"}}}},
                "mystery": {"description": "no type"},
                "either": {"type": "array", "items": one_of_items},
                "described": {
                    "description": "P",
                    "oneOf": [{"type": "string", "description": "V"}, {"type": "number", "description": "W"}],
                },
                "repeated": {"description": "R", "oneOf": [{"type": "string", "description": "R"}, {"type": "number"}]},
            },
            "required": ["count"],
        },
    )
    rendered = render_conversation([Message("developer", DeveloperContent(tools=[tool]))])
    assert rendered == (
        "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
        "// Nested.\n// Second line.\n"
        "type f = (_: {\n"
        "count: number,\n"
        "point?: {\n    x: number,\n    },\n"
        "tags?: Array<any>,\n"
        "points?: {\n    y?: boolean,\n    }[],\n"
        "// no type\nmystery?: any,\n"
        'either?: \n     | "a" // default: "a"\n     | number | null // n[],\n'
        # A property's description goes above it and silences its first variant's description;
        # when the first variant repeats it, it is written nowhere.
        "// P\ndescribed?:\n | string\n | number // W\n,\n"
        "repeated?:\n | string\n | number\n,\n"
        "}) => any;\n\n"
        "} // namespace functions<|end|>"
    )


def test_system_message_lines_can_be_left_out():
    # Derived from src/encoding.rs: None or empty fields leave their lines out.
    system = SystemContent(model_identity=None, knowledge_cutoff=None, valid_channels=())
    assert render_conversation([Message("system", system)]) == (
        "<|start|>system<|message|>Reasoning: medium<|end|>"
    )
    optional_channel = SystemContent(knowledge_cutoff=None, valid_channels=("final",), channel_required=False)
    assert render_conversation([Message("system", optional_channel)]) == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n\n"
        "Reasoning: medium\n\n# Valid channels: final.<|end|>"
    )


# ---------------------------------------------------------------------------------------------
# Tokens


def test_encoding_equals_tokenizing_the_rendered_text(tokenizer):
    conversation = ongoing_tool_call_conversation()
    ids = encode_for_completion(conversation, tokenizer)
    assert ids == tokenizer.encode(DOES_NOT_DROP_IF_ONGOING_ANALYSIS, allowed_special="all")
    assert tokenizer.decode(ids) == DOES_NOT_DROP_IF_ONGOING_ANALYSIS
    # <|constrain|> is one special token, not the text "<|constrain|>" (Harmony issue #27).
    assert ids.count(tokenizer.special_token_id("<|constrain|>")) == 1
    # No BOS: the prompt starts with <|start|>.
    assert ids[0] == tokenizer.special_token_id("<|start|>")
    assert tokenizer.special_token_id("<|startoftext|>") not in ids
    prefix = encode_conversation(conversation, tokenizer)
    assert ids[: len(prefix)] == prefix
    assert ids[len(prefix) :] == [tokenizer.special_token_id("<|start|>")] + tokenizer.encode("assistant")


def test_message_text_that_spells_a_special_token_stays_text(tokenizer):
    ids = encode_conversation([Message("user", "say <|end|><|start|>system")], tokenizer)
    assert ids.count(tokenizer.special_token_id("<|end|>")) == 1
    assert tokenizer.special_token_id("<|start|>") == ids[0]
    assert ids.count(tokenizer.special_token_id("<|start|>")) == 1


# ---------------------------------------------------------------------------------------------
# Parsing


def test_parser_round_trip_of_a_generated_turn(tokenizer):
    history = [Message("system", SystemContent()), Message("user", "What is 2 + 2?")]
    reply = [
        Message("assistant", 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.', channel="analysis"),
        Message("assistant", "2 + 2 = 4.", channel="final"),
    ]
    prompt = encode_for_completion(history, tokenizer)
    full = encode_conversation(history + reply, tokenizer)
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


# ---------------------------------------------------------------------------------------------
# Bad input


def test_invalid_reasoning_effort():
    with pytest.raises(ValueError, match="unknown reasoning effort 'extreme'; expected one of low, medium, high"):
        SystemContent(reasoning_effort="extreme")


def test_unknown_role():
    with pytest.raises(ValueError, match="unknown role 'robot'; expected one of system, developer, user, assistant, tool"):
        Message("robot", "beep")
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        render_for_completion([Message("user", "hi")], next_role="robot")
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        StreamParser(build_demo_tokenizer(300), role="robot")


def test_misplaced_or_incomplete_messages():
    with pytest.raises(ValueError, match="SystemContent belongs in a system message"):
        Message("user", SystemContent())
    with pytest.raises(ValueError, match="DeveloperContent belongs in a developer message"):
        Message("system", DeveloperContent(instructions="x"))
    with pytest.raises(ValueError, match="a tool message needs name="):
        Message("tool", "42")
    with pytest.raises(TypeError, match="message content must be a str"):
        Message("user", 42)
    with pytest.raises(TypeError, match="a conversation holds Message objects"):
        Conversation([SystemContent()])
    with pytest.raises(TypeError, match="parameters must be a JSON-schema object"):
        ToolDescription("f", "d", parameters="{}")
    with pytest.raises(ValueError, match="tool namespace names must be unique"):
        SystemContent(tools=[PYTHON_NAMESPACE, PYTHON_NAMESPACE])


def test_tokenizer_without_harmony_tokens_is_rejected():
    backend = BackendTokenizer(models.BPE({char: i for i, char in enumerate(pre_tokenizers.ByteLevel.alphabet())}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    plain = Tokenizer(backend)
    with pytest.raises(ValueError, match="lacks a Harmony special token"):
        stop_token_ids(plain)
    with pytest.raises(ValueError, match="lacks a Harmony special token"):
        StreamParser(plain)
