"""response_format: JSON-schema-constrained decoding with llama.cpp's own converter.

The grammar comes from llama.cpp's JSON-schema-to-GBNF converter (the Python port shipped in
llama-cpp-python, `llama_cpp.llama_grammar`). That converter enforces a subset of JSON Schema
and, where a schema node mixes keywords, follows one branch and drops the rest silently (a
string with both `pattern` and `maxLength` keeps only the pattern). `unenforceable` mirrors its
branch order and lists everything it would drop, so such a schema is refused with the list
instead of producing output that fails validation.

One rewrite widens what it enforces without writing grammar ourselves: an integer with both
bounds and at most 256 values becomes the equivalent `enum`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from .errors import InvalidInput, LocalGemmaError

ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
               "deprecated", "readOnly", "writeOnly", "$defs", "definitions"}
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
MAX_ENUM_RANGE = 256


class StructuredOutputError(LocalGemmaError):
    """The model's constrained output could not be completed (e.g. max_tokens ran out)."""

    code = 5004


def schema_of(response_format) -> dict:
    """Workers AI passes the schema itself; OpenAI wraps it as {name, schema, strict}."""
    if response_format.type == "json_object":
        return {"type": "object"}
    spec = response_format.json_schema
    if not spec:
        raise InvalidInput("response_format.json_schema: a JSON schema is required with type json_schema")
    if isinstance(spec.get("schema"), dict) and "properties" not in spec:
        spec = spec["schema"]
    return spec


def grammar_for(schema: dict) -> str:
    """A GBNF grammar whose every sentence validates against `schema` (or InvalidInput)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = _rewrite(schema)
    problems = unenforceable(schema)
    if problems:
        raise InvalidInput("response_format: the grammar cannot enforce " + "; ".join(problems))
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter asserts and raises on what it does not know
        raise InvalidInput(f"response_format: llama.cpp's schema converter refused the schema ({exc})") from None


def parse(text: str, schema: dict, finish_reason: str, max_tokens: int) -> Any:
    """The generated JSON as a value, validated; a clear error when it was cut short."""
    if finish_reason == "length":
        raise StructuredOutputError(
            f"max_tokens: the JSON was not finished within {max_tokens} tokens; raise max_tokens")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StructuredOutputError(f"response_format: constrained output is not JSON ({exc}): {text[:200]!r}") from None
    try:
        import jsonschema
    except ImportError:
        return value
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise StructuredOutputError(f"response_format: output failed validation ({exc.message})") from None
    return value


# -- what the converter enforces ------------------------------------------------------------

def _rewrite(node: Any) -> Any:
    """Small closed integer ranges -> enum (enforced exactly); everything else unchanged."""
    if isinstance(node, list):
        return [_rewrite(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: (_rewrite(v) if k not in ("enum", "const", "default", "examples") else v) for k, v in node.items()}
    if node.get("type") == "integer" and _bounds(node) is not None:
        low, high = _bounds(node)
        if high - low < MAX_ENUM_RANGE:
            rest = {k: v for k, v in node.items()
                    if k not in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")}
            return {**rest, "enum": list(range(low, high + 1))}
    return node


def _bounds(node: dict) -> Optional[tuple[int, int]]:
    import math

    low = node.get("minimum", None)
    high = node.get("maximum", None)
    if "exclusiveMinimum" in node:
        low = node["exclusiveMinimum"] + 1 if isinstance(node["exclusiveMinimum"], (int, float)) else low
    if "exclusiveMaximum" in node:
        high = node["exclusiveMaximum"] - 1 if isinstance(node["exclusiveMaximum"], (int, float)) else high
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
        return None
    return math.ceil(low), math.floor(high)


def unenforceable(schema: Any, path: str = "$") -> list[str]:
    """Every keyword the converter would not enforce, as 'path: keyword (why)'."""
    if schema is True or schema == {}:
        return []
    if not isinstance(schema, dict):
        return [f"{path}: {json.dumps(schema)} (a schema must be an object)"]
    honoured, children, problems = _branch(schema, path)
    for key in schema:
        if key not in honoured and key not in ANNOTATIONS:
            problems.append(f"{path}: {key} ({_why(key, schema)})")
    for child_path, child in children:
        problems += unenforceable(child, child_path)
    return problems


def _branch(s: dict, path: str) -> tuple[set, list, list]:
    """Which keywords the converter's branch for `s` honours, which sub-schemas it visits, and
    problems with the branch itself. Mirrors SchemaConverter.visit's order."""
    kind = s.get("type")
    if "$ref" in s:
        ok = s["$ref"].startswith("#/")
        return {"$ref"}, [], [] if ok else [f"{path}: $ref {s['$ref']!r} (only local #/ references)"]
    if "anyOf" in s:
        return {"anyOf"}, [(f"{path}.anyOf[{i}]", b) for i, b in enumerate(s["anyOf"])], []
    if "oneOf" in s:
        return {"oneOf"}, [], [f"{path}: oneOf (exactly-one cannot be enforced; anyOf can)"]
    if isinstance(kind, list):
        bad = [t for t in kind if t not in TYPES]
        return {"type"}, [], [f"{path}: type {t!r} (unknown type)" for t in bad]
    if kind is not None and kind not in TYPES:
        return set(), [], [f"{path}: type {kind!r} (not a JSON Schema type)"]
    if "const" in s:
        return {"const", "type"}, [], []
    if "enum" in s:
        return {"enum", "type"}, [], []
    if kind in (None, "object") and ("properties" in s or s.get("additionalProperties", True) is not True):
        props = s.get("properties", {})
        missing = [r for r in s.get("required", []) if r not in props]
        problems = [f"{path}: required {r!r} (it has no schema in properties)" for r in missing]
        children = [(f"{path}.properties.{k}", v) for k, v in props.items()]
        if isinstance(s.get("additionalProperties"), dict):
            children.append((f"{path}.additionalProperties", s["additionalProperties"]))
        return {"type", "properties", "required", "additionalProperties"}, children, problems
    if kind in (None, "array") and ("items" in s or "prefixItems" in s):
        items = s.get("items") if "items" in s else s["prefixItems"]
        if isinstance(items, list):
            return {"type", "items", "prefixItems"}, [(f"{path}.items[{i}]", b) for i, b in enumerate(items)], []
        return {"type", "items", "minItems", "maxItems"}, [(f"{path}.items", items)], []
    if kind in (None, "string") and "pattern" in s:
        return {"type", "pattern"}, [], []
    if kind in (None, "string") and s.get("format") in FORMATS:
        return {"type", "format"}, [], []
    if kind == "string" and ("minLength" in s or "maxLength" in s):
        return {"type", "minLength", "maxLength"}, [], []
    if kind is None:
        # only annotations: the converter has nothing to go on (other keys are reported by name)
        return set(), [], [f"{path}: no type (say which JSON type this is)"] if set(s) <= ANNOTATIONS else []
    return {"type"}, [], []


_WHY = {
    "minimum": "numeric bounds: only integer ranges of at most 256 values are enforced",
    "maximum": "numeric bounds: only integer ranges of at most 256 values are enforced",
    "exclusiveMinimum": "numeric bounds: only integer ranges of at most 256 values are enforced",
    "exclusiveMaximum": "numeric bounds: only integer ranges of at most 256 values are enforced",
    "format": "supported formats: " + ", ".join(sorted(FORMATS)),
    "minLength": "not together with pattern or format",
    "maxLength": "not together with pattern or format",
    "minItems": "only with items given as one schema",
    "maxItems": "only with items given as one schema",
}


def _why(key: str, schema: dict) -> str:
    if key in ("properties", "required", "additionalProperties", "items", "prefixItems", "pattern"):
        return "ignored in this combination of keywords"
    return _WHY.get(key, "not supported by llama.cpp's schema converter")
