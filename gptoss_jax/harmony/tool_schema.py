"""Tool declarations as Harmony writes them: each JSON-schema parameter object as the
TypeScript-like type of a `type name = (_: {...}) => any;` line, inside `## namespace` sections.

Follows openai/harmony's `json_schema_to_typescript` and tools rendering (`src/encoding.rs`)
branch for branch, so that the rendered text matches that renderer's test data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from gptoss_jax.harmony.messages import ToolNamespace


def _lines(text: str) -> list[str]:
    """`text` split into lines the way Harmony's renderer (Rust `str::lines`) splits it.

    Unlike `str.splitlines`, only `\\n` ends a line (a `\\r` before it is dropped), and a
    trailing newline does not start an empty last line.
    """
    if not text:
        return []
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _json_value(value: Any) -> str:
    # Compact, like serde_json's Display of a value, which Harmony uses for non-string defaults.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _field(schema: Any, key: str) -> Any:
    return schema.get(key) if isinstance(schema, Mapping) else None


def _is_enum(schema: Any) -> bool:
    values = _field(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _default_text(schema: Mapping[str, Any]) -> str:
    """A property's default as Harmony comments it: enum strings bare, other strings quoted."""
    default = schema["default"]
    if isinstance(default, str):
        return default if _is_enum(schema) else f'"{default}"'
    return _json_value(default)


def _with_nullable(schema: Any, type_text: str) -> str:
    if _field(schema, "nullable") is True and "null" not in type_text:
        return f"{type_text} | null"
    return type_text


def _schema_to_typescript(schema: Any, indent: str) -> str:
    """A JSON schema as the TypeScript-like type Harmony puts in tool signatures."""
    one_of = _field(schema, "oneOf")
    if isinstance(one_of, list):
        return _top_level_one_of(one_of, indent)
    schema_type = _field(schema, "type")
    if isinstance(schema_type, list):
        names = ["number" if name == "integer" else name for name in schema_type if isinstance(name, str)]
        return " | ".join(names) if names else "any"
    if schema_type == "object":
        return _object_to_typescript(schema, indent)
    if schema_type == "string":
        values = _field(schema, "enum")
        strings = [value for value in values if isinstance(value, str)] if isinstance(values, list) else []
        return " | ".join(f'"{value}"' for value in strings) if strings else "string"
    if schema_type in ("number", "integer"):
        return "number"
    if schema_type == "boolean":
        return "boolean"
    if schema_type == "array":
        items = _field(schema, "items")
        return f"{_schema_to_typescript(items, indent)}[]" if items is not None else "Array<any>"
    return "any"


def _top_level_one_of(variants: list[Any], indent: str) -> str:
    out = []
    for variant in variants:
        variant_text = _with_nullable(variant, _schema_to_typescript(variant, indent + "   "))
        comments = []
        description = _field(variant, "description")
        if isinstance(description, str):
            comments.append(description)
        if isinstance(variant, Mapping) and "default" in variant:
            # Here Harmony quotes every string default, enum or not (serde_json's Display).
            default = variant["default"]
            plain = isinstance(default, str) and not _is_enum(variant)
            comments.append(f'default: "{default}"' if plain else f"default: {_json_value(default)}")
        trailer = f" // {' '.join(comments)}" if comments else ""
        out.append(f"\n{indent} | {variant_text}{trailer}")
    return "".join(out)


def _object_to_typescript(schema: Mapping[str, Any], indent: str) -> str:
    out = []
    description = schema.get("description")
    if isinstance(description, str):
        out.append(f"{indent}// {description}\n")
    out.append("{\n")
    properties = schema.get("properties")
    if isinstance(properties, Mapping):
        required_list = schema.get("required")
        required = set(required_list) if isinstance(required_list, list) else set()
        for key, prop in properties.items():
            marker = "" if key in required else "?"
            title = _field(prop, "title")
            if isinstance(title, str):
                out.append(f"{indent}// {title}\n{indent}//\n")
            has_one_of = _field(prop, "oneOf") is not None
            prop_description = _field(prop, "description")
            if not has_one_of and isinstance(prop_description, str):
                out.append(f"{indent}// {prop_description}\n")
            examples = _field(prop, "examples")
            if isinstance(examples, list) and examples:
                out.append(f"{indent}// Examples:\n")
                out.extend(f'{indent}// - "{example}"\n' for example in examples if isinstance(example, str))
            one_of = _field(prop, "oneOf")
            if isinstance(one_of, list):
                out.append(_one_of_property(key, marker, prop, one_of, indent))
                continue
            type_text = _with_nullable(prop, _schema_to_typescript(prop, indent + "    "))
            line = f"{indent}{key}{marker}: {type_text},"
            if not has_one_of and isinstance(prop, Mapping) and "default" in prop:
                line += f" // default: {_default_text(prop)}"
            out.append(line + "\n")
    out.append(f"{indent}}}")
    return "".join(out)


def _one_of_property(key: str, marker: str, prop: Mapping[str, Any], variants: list[Any], indent: str) -> str:
    out = []
    description = prop.get("description")
    description = description if isinstance(description, str) else None
    # The property's description goes above the name unless the first variant repeats it.
    first_description = _field(variants[0], "description") if variants else None
    described_above = description is not None and first_description != description
    if described_above:
        out.append(f"{indent}// {description}\n")
    if "default" in prop:
        out.append(f"{indent}// default: {_default_text(prop)}\n")
    out.append(f"{indent}{key}{marker}:\n")
    for position, variant in enumerate(variants):
        variant_text = _with_nullable(variant, _schema_to_typescript(variant, indent + "   "))
        comments = []
        variant_description = _field(variant, "description")
        if not (position == 0 and described_above) and isinstance(variant_description, str):
            if variant_description != description:
                comments.append(variant_description)
        if isinstance(variant, Mapping) and "default" in variant:
            comments.append(f"default: {_default_text(variant)}")
        trailer = f" // {' '.join(comments)}" if comments else ""
        out.append(f"{indent} | {variant_text}{trailer}\n")
    out.append(f"{indent},\n")
    return "".join(out)


def render_tools_section(namespaces: Iterable[ToolNamespace]) -> str:
    """The `# Tools` section of a system or developer message, namespaces sorted by name."""
    sections = ["# Tools"]
    # Harmony keeps namespaces in a map sorted by name.
    for namespace in sorted(namespaces, key=lambda ns: ns.name):
        lines = [f"## {namespace.name}\n"]
        description_lines = _lines(namespace.description or "")
        # Beside TypeScript declarations the description must be a comment; alone it is prose.
        lines += [f"// {line}" for line in description_lines] if namespace.tools else description_lines
        if namespace.tools:
            lines.append(f"namespace {namespace.name} {{\n")
            for tool in namespace.tools:
                lines += [f"// {line}" for line in _lines(tool.description)]
                if tool.parameters is None:
                    lines.append(f"type {tool.name} = () => any;\n")
                else:
                    parameters = _schema_to_typescript(tool.parameters, "")
                    lines.append(f"type {tool.name} = (_: {parameters}) => any;\n")
            lines.append(f"}} // namespace {namespace.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)
