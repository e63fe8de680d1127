"""Grammars of a whole Harmony reply, in llguidance's Lark dialect (text only: no llguidance here).

A constrained reply follows the grammar from the token after the prompt's ``<|start|>assistant``
to its stop token, Harmony's frame included, so a model cannot wander into a malformed header
and never reach the answer::

    (analysis or preamble message, <|end|><|start|>assistant)*  then  the answer or a tool call

- the analysis channel (and a commentary preamble to no one) is free text;
- the answer is ``<|channel|>final<|message|>`` then the answer's grammar (a JSON schema, a
  regex, a Lark grammar, or free text), then ``<|return|>``;
- a tool call is ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>``, its
  arguments (valid against the function's parameters when the tool is strict), then ``<|call|>``.

Control tokens appear as llguidance's special-token references (``<|end|>``), so they are
allowed exactly where the grammar puts them: ``<|return|>`` and ``<|call|>`` only once the
answer or the arguments are complete.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from gptoss_jax.harmony.messages import FUNCTIONS_NAMESPACE

FREE_TEXT = "/(?s:.*)/"
"""Any text without control tokens (llguidance keeps special tokens out of a regex)."""

JSON_WHITESPACE = "[ \\t\\n\\r]{0,12}"
"""Whitespace allowed between JSON tokens: enough for indented JSON, bounded so that a sampler
cannot write spaces forever."""


@dataclasses.dataclass(frozen=True)
class AnswerGrammar:
    """What the final message holds: one of a JSON schema, a regex or a Lark grammar (none: free text)."""

    json_schema: Mapping[str, Any] | bool | None = None
    regex: str | None = None
    lark: str | None = None

    def body(self) -> str:
        """The Lark expression of the answer."""
        if self.json_schema is not None:
            return json_schema_expression(self.json_schema)
        if self.regex is not None:
            return "/" + self.regex.replace("/", "\\/") + "/"
        if self.lark is not None:
            return "%lark {\n" + self.lark + "\n}"
        return FREE_TEXT


@dataclasses.dataclass(frozen=True)
class ToolGrammar:
    """A function the reply may call; ``parameters`` constrains its arguments when it is strict."""

    name: str
    parameters: Mapping[str, Any] | None = None
    strict: bool = False

    def arguments(self) -> str:
        if self.strict:
            return json_schema_expression(self.parameters if self.parameters is not None else {"type": "object"})
        return FREE_TEXT


FREE_PRELUDE = (
    "start: prelude* reply\n"
    'prelude: <|channel|> ("analysis" | "commentary") <|message|> TEXT <|end|> <|start|> "assistant"\n'
    f"TEXT: {FREE_TEXT}\n"
)
"""How every :func:`reply_grammar` begins: messages of free text (analysis, preambles) before the
reply. A grammar that begins so lets the engine run a row through such a message in multi-step
bursts under one mask, since the mask stays the same until ``<|end|>``."""


def json_schema_expression(schema: Mapping[str, Any] | bool) -> str:
    """The Lark expression of a JSON value valid against ``schema``, with bounded whitespace."""
    if isinstance(schema, Mapping):
        options = dict(schema.get("x-guidance") or {})
        options.setdefault("whitespace_pattern", JSON_WHITESPACE)
        schema = dict(schema, **{"x-guidance": options})
    return f"%json {json.dumps(schema)}"


def _literal(text: str) -> str:
    return json.dumps(text)


def _call(tool: ToolGrammar, rule: str) -> str:
    header = f"commentary to={FUNCTIONS_NAMESPACE}.{tool.name} "
    return f"{rule}: <|channel|> {_literal(header)} <|constrain|> \"json\" <|message|> {tool.arguments()} <|call|>"


def reply_grammar(answer: AnswerGrammar | None, tools: Sequence[ToolGrammar] = (), *,
                  tool_choice: str = "auto") -> str:
    """The grammar of a reply that starts right after ``<|start|>assistant``.

    Args:
      answer: what the final message holds (None: free text).
      tools: the functions it may call.
      tool_choice: ``auto`` (answer or call), ``none`` (answer only), ``required`` (a call to
        one of ``tools``) or a function's name (a call to that one). A required or named call
        comes after any analysis.
    """
    names = [tool.name for tool in tools]
    if tool_choice in ("auto", "none", "required"):
        callable_tools = [] if tool_choice == "none" else list(tools)
    else:
        callable_tools = [tool for tool in tools if tool.name == tool_choice]
        if not callable_tools:
            raise ValueError(f"tool_choice names {tool_choice!r}, not one of the tools {names}")
    rules = []
    alternatives = [] if tool_choice not in ("auto", "none") else ["final"]
    if alternatives:
        rules.append(f"final: <|channel|> \"final\" <|message|> {(answer or AnswerGrammar()).body()} <|return|>")
    for index, tool in enumerate(callable_tools):
        rules.append(_call(tool, f"call_{index}"))
        alternatives.append(f"call_{index}")
    if not alternatives:
        raise ValueError("tool_choice 'required' needs tools")
    return FREE_PRELUDE + "reply: " + " | ".join(alternatives) + "\n" + "\n".join(rules) + "\n"


def call_arguments_grammar(tools: Sequence[ToolGrammar], *, named: bool) -> str:
    """The grammar of a reply whose call header the server forced into the prompt.

    ``named``: the prompt ends with the whole header (``... <|constrain|>json<|message|>``), so
    the reply is ``tools[0]``'s arguments and ``<|call|>``; else it ends with ``to=functions.``
    and the reply names one of ``tools`` first.
    """
    if named:
        return f"start: {tools[0].arguments()} <|call|>\n"
    rules = ["start: " + " | ".join(f"call_{index}" for index in range(len(tools)))]
    for index, tool in enumerate(tools):
        rules.append(f"call_{index}: {_literal(tool.name + ' ')} <|constrain|> \"json\" <|message|> "
                     f"{tool.arguments()} <|call|>")
    return "\n".join(rules) + "\n"
