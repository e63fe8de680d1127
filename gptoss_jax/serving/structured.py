"""OpenAI's structured-output settings -> the grammar of the whole Harmony reply (checked at request time).

Chat's ``response_format`` and the Responses API's ``text.format`` (``text``, ``json_object``,
``json_schema``) constrain the final message; a function tool with ``"strict": true`` constrains
its call's arguments; ``tool_choice`` ``required`` or a named function makes the reply a call.
Every schema is compiled here, before the request reaches the engine, so a bad one is a 400
naming its field, never an error mid-stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gptoss_jax.engine.constraints import compile_grammar
from gptoss_jax.engine.requests import RequestError
from gptoss_jax.harmony.grammar import AnswerGrammar, ToolGrammar, call_arguments_grammar, json_schema_expression, \
    reply_grammar
from gptoss_jax.serving.translate import ToolChoice, TranslationError
from gptoss_jax.tokenizer import Tokenizer

# JSON Schema's keywords (draft 2020-12 and the older definitions/dependencies), and OpenAI's
# strict mode refuses any other key in a schema.
_SUBSCHEMA_KEYWORDS = {"additionalProperties", "items", "not", "contains", "propertyNames", "if", "then", "else",
                       "additionalItems", "unevaluatedItems", "unevaluatedProperties"}
_SUBSCHEMA_MAP_KEYWORDS = {"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"}
_SUBSCHEMA_LIST_KEYWORDS = {"anyOf", "oneOf", "allOf", "prefixItems"}
_VALUE_KEYWORDS = {
    "type", "enum", "const", "required", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minLength", "maxLength", "pattern", "format", "minItems", "maxItems", "uniqueItems", "minProperties",
    "maxProperties", "dependentRequired", "title", "description", "default", "examples", "$ref", "$schema", "$id",
    "$comment", "$anchor", "readOnly", "writeOnly", "deprecated", "contentEncoding", "contentMediaType", "nullable",
    "minContains", "maxContains", "dependencies",
}
_KEYWORDS = _SUBSCHEMA_KEYWORDS | _SUBSCHEMA_MAP_KEYWORDS | _SUBSCHEMA_LIST_KEYWORDS | _VALUE_KEYWORDS


def _check_keywords(schema: Any, field: str) -> None:
    """Refuse keys that are no JSON Schema keyword anywhere in ``schema`` (strict mode)."""
    if not isinstance(schema, Mapping):
        return
    for key, value in schema.items():
        where = f"{field}.{key}"
        if key not in _KEYWORDS:
            raise TranslationError(f"{where}: unknown JSON Schema keyword {key!r} (strict mode allows none)")
        if key in _SUBSCHEMA_KEYWORDS:
            _check_keywords(value, where)
        elif key in _SUBSCHEMA_MAP_KEYWORDS and isinstance(value, Mapping):
            for name, subschema in value.items():
                _check_keywords(subschema, f"{where}.{name}")
        elif key in _SUBSCHEMA_LIST_KEYWORDS and isinstance(value, Sequence):
            for index, subschema in enumerate(value):
                _check_keywords(subschema, f"{where}[{index}]")


def checked_schema(schema: Any, strict: bool, field: str, tokenizer: Tokenizer) -> Mapping[str, Any]:
    """``schema`` if it is a JSON Schema object the grammar engine compiles, else a 400 naming ``field``."""
    if not isinstance(schema, Mapping):
        raise TranslationError(f"{field}: a JSON Schema must be an object, got {type(schema).__name__}")
    if strict:
        _check_keywords(schema, field)
    try:
        compile_grammar(tokenizer, f"start: {json_schema_expression(schema)}\n", field)
    except RequestError as error:
        raise TranslationError(str(error)) from None
    return schema


def answer_grammar(response_format: Mapping[str, Any] | None, field: str, *, nested: bool,
                   tokenizer: Tokenizer) -> AnswerGrammar | None:
    """Chat's ``response_format`` (``nested``: the schema under ``json_schema``) or Responses'
    ``text.format`` (the schema beside ``type``) -> what the final message must hold (None: text)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return AnswerGrammar(json_schema={"type": "object"})
    if kind != "json_schema":
        raise TranslationError(f"{field}.type: expected text, json_object or json_schema, got {kind!r}")
    spec = response_format.get("json_schema") if nested else response_format
    spec_field = f"{field}.json_schema" if nested else field
    if not isinstance(spec, Mapping) or "schema" not in spec:
        raise TranslationError(f"{spec_field}.schema: a json_schema format needs a schema")
    return AnswerGrammar(json_schema=checked_schema(spec["schema"], bool(spec.get("strict")), f"{spec_field}.schema",
                                                    tokenizer))


def tool_grammars(tools: Sequence[Mapping[str, Any]] | None, *, nested: bool,
                  tokenizer: Tokenizer) -> list[ToolGrammar]:
    """The function tools with their strictness; a strict tool's parameters are checked here."""
    grammars = []
    for index, tool in enumerate(tools or ()):
        spec = tool.get("function") if nested else tool
        field = f"tools[{index}].function" if nested else f"tools[{index}]"
        strict = bool(spec.get("strict"))
        parameters = spec.get("parameters")
        if strict:
            parameters = checked_schema(parameters if parameters is not None else {"type": "object"}, True,
                                        f"{field}.parameters", tokenizer)
        grammars.append(ToolGrammar(spec["name"], parameters, strict))
    return grammars


def reply_constraint(answer: AnswerGrammar | None, tools: Sequence[ToolGrammar],
                     tool_choice: ToolChoice) -> str | None:
    """The grammar of the whole reply (after the prompt and any call header it forces), or None
    when nothing in the request constrains it.

    ``required`` and named choices force the call's header into the prompt (see
    ``build_prompt``): their grammar starts after it, and constrains when a callable tool is strict.
    """
    if tool_choice == "required":
        return call_arguments_grammar(tools, named=False) if any(tool.strict for tool in tools) else None
    if tool_choice not in ("auto", "none"):
        named = [tool for tool in tools if tool.name == tool_choice]
        return call_arguments_grammar(named, named=True) if named[0].strict else None
    callable_tools = tools if tool_choice == "auto" else ()
    if answer is None and not any(tool.strict for tool in callable_tools):
        return None
    return reply_grammar(answer, callable_tools, tool_choice=tool_choice)
