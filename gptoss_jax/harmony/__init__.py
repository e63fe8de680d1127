"""Harmony, gpt-oss's chat format: messages, rendering to text and tokens, streaming parsing.

A native implementation (no `openai_harmony`, no vocabulary download) of the format that
openai/harmony documents in `docs/format.md` and implements in `src/encoding.rs`; the rendered
text matches that renderer's test data character for character, and the tests check the token
ids against openai_harmony itself on o200k_harmony.

Modules, one concept each:

- `messages`: roles, reasoning efforts, tools, system and developer content, messages,
  conversations; the control tokens' text.
- `tool_schema`: tools' JSON schemas as the TypeScript-like declarations Harmony writes.
- `render`: conversations to text and to token ids; `drop_answered_analysis`, Harmony's rule
  for the chain of thought of answered turns.
- `parser`: generated tokens to messages, one token at a time; the stop tokens.
- `encoding`: openai_harmony's names (`HarmonyEncoding.render_conversation_for_completion`,
  `StreamableParser`, `stop_tokens_for_assistant_actions`) over the above.

Special-token ids always come from the `Tokenizer`, so the same code serves o200k_harmony and
the small demo tokenizer.
"""

from gptoss_jax.harmony.encoding import HarmonyEncoding, StreamableParser
from gptoss_jax.harmony.messages import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    DEFAULT_KNOWLEDGE_CUTOFF,
    DEFAULT_MODEL_IDENTITY,
    DEFAULT_VALID_CHANNELS,
    END,
    FUNCTIONS_NAMESPACE,
    MESSAGE,
    RETURN,
    START,
    Conversation,
    DeveloperContent,
    HarmonyError,
    Message,
    MessageContent,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
    ToolNamespace,
)
from gptoss_jax.harmony.parser import HarmonyParseError, StreamParser, StreamState, parse_completion, stop_token_ids
from gptoss_jax.harmony.render import (
    drop_answered_analysis,
    encode_conversation,
    encode_for_completion,
    render_conversation,
    render_for_completion,
)

__all__ = [
    "CALL",
    "CHANNEL",
    "CONSTRAIN",
    "DEFAULT_KNOWLEDGE_CUTOFF",
    "DEFAULT_MODEL_IDENTITY",
    "DEFAULT_VALID_CHANNELS",
    "END",
    "FUNCTIONS_NAMESPACE",
    "MESSAGE",
    "RETURN",
    "START",
    "Conversation",
    "DeveloperContent",
    "HarmonyEncoding",
    "HarmonyError",
    "HarmonyParseError",
    "Message",
    "MessageContent",
    "ReasoningEffort",
    "Role",
    "StreamParser",
    "StreamState",
    "StreamableParser",
    "SystemContent",
    "ToolDescription",
    "ToolNamespace",
    "drop_answered_analysis",
    "encode_conversation",
    "encode_for_completion",
    "parse_completion",
    "render_conversation",
    "render_for_completion",
    "stop_token_ids",
]
