"""What the Harmony tests share: the strings that openai/harmony documents, the conversations
and tools that produce them.

Expected strings are copied verbatim from github.com/openai/harmony (commit ec7606d, v0.0.8):
the renderer's `test-data/*.txt` files (each named above its literal) and `docs/format.md`.
"""

from gptoss_jax.harmony import Conversation, Message, ToolDescription, ToolNamespace

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
