"""response_format: JSON-schema-constrained decoding with llama.cpp's own converter.

The grammar comes from llama.cpp's JSON-schema-to-GBNF converter (the Python port shipped in
llama-cpp-python, `llama_cpp.llama_grammar`). That converter enforces a subset of JSON Schema
and, where a schema node mixes keywords, follows one branch and drops the rest silently (a
string with both `pattern` and `maxLength` keeps only the pattern). `unenforceable` mirrors its
branch order and lists everything it would drop, so such a schema is refused with the list
instead of producing output that fails validation.

One rewrite widens what it enforces without writing grammar ourselves: an integer with both
bounds and at most 256 values becomes the equivalent `enum`.

Limits keep a valid schema from taking the server down: the converter recurses once per level
of nesting, and writes `maxLength: n` / `maxItems: n` as n nested optional groups, which
llama.cpp's grammar parser walks recursively (n = 30,000 overflowed the C stack; above 1000
it refuses the grammar).
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from .errors import InvalidInput, StructuredOutputError

ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
               "deprecated", "readOnly", "writeOnly", "$defs", "definitions"}
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
MAX_ENUM_RANGE = 256
MAX_DEPTH = 64  # nested JSON containers (an object property is two: "properties", then its schema)
# minLength / maxLength / minItems / maxItems: the converter spells `maxLength: n` out as n
# nested optional groups; llama.cpp's grammar parser refuses more than 1000 (measured).
MAX_REPEAT = 1000
# enum values in a whole schema: llama.cpp's grammar takes ~0.5 s at 10,000 and grows faster than
# their number (~3 s at 30,000, ~22 s at 100,000, measured on the embedded model).
MAX_ENUM_VALUES = 10000
_REPEATS = ("minLength", "maxLength", "minItems", "maxItems")


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


def check(schema: Any, where: str = "response_format", depth: int = 0) -> dict:
    """The schema as the converter will see it (small integer ranges rewritten to enums), or
    InvalidInput listing every part the grammar cannot enforce. The one gate for both
    response_format and tool parameters. `depth`: levels the caller nests it under."""
    problems = _limits(schema, depth)
    if not problems:
        malformed = _malformed(schema)
        if malformed:
            raise InvalidInput(f"{where}: not a valid JSON Schema: " + "; ".join(malformed))
        schema = _rewrite(schema)
        problems = unenforceable(schema)
    if problems:
        raise InvalidInput(f"{where}: the grammar cannot enforce " + "; ".join(problems))
    return schema


def _malformed(schema: Any) -> list[str]:
    """Where `schema` breaks JSON Schema's own rules (its metaschema: the draft its `$schema`
    names, else 2020-12), as 'path: what is wrong'. Checked before anything walks the schema
    expecting its shape, and before the answer is validated against it."""
    from jsonschema.exceptions import best_match
    from jsonschema.validators import Draft202012Validator, validator_for

    cls = validator_for(schema, default=Draft202012Validator) if isinstance(schema, dict) else Draft202012Validator
    found = []
    for error in cls(cls.META_SCHEMA).iter_errors(schema):
        error = best_match(error.context) if error.context else error  # "not valid under any of..." says less
        found.append(f"{_path(error.absolute_path)}: {error.message}")
    return sorted(dict.fromkeys(found))[:10]  # the draft's vocabularies repeat some rules


def _path(parts) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def grammar_for(schema: dict, where: str = "response_format") -> str:
    """A GBNF grammar whose every sentence validates against `schema` (or InvalidInput)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = check(schema, where)
    try:
        return _json_strings(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter asserts and raises on what it does not know
        raise InvalidInput(f"{where}: llama.cpp's schema converter refused the schema ({exc})") from None


# llama-cpp-python's port of the converter lets raw control characters into JSON strings (its
# `char` rule is [^"\\]; llama.cpp's C++ converter has [^"\\\x7F\x00-\x1F]), and a pattern's "."
# into quotes and backslashes: output a JSON parser rejects ("Invalid control character").
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F]'
_STRING_RULES = {"char ::= ": (r'[^"\\]', _JSON_CHAR), "dot ::= ": (r"[^\x0A\x0D]", _JSON_CHAR)}


def _json_strings(gbnf: str) -> str:
    lines = gbnf.splitlines()
    for i, line in enumerate(lines):
        for head, (loose, strict) in _STRING_RULES.items():
            if line.startswith(head):
                lines[i] = line.replace(loose, strict, 1)
    return "\n".join(lines) + "\n"


def parse(text: str, schema: dict, finish_reason: str, max_tokens: int) -> Any:
    """The generated JSON as a value, validated; a clear error when it was cut short. JSON
    finished by the last token max_tokens allowed is an answer (its finish_reason stays
    "length": the end of turn was not reached)."""
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        if finish_reason == "length":
            raise StructuredOutputError(
                f"max_tokens: the JSON was not finished within {max_tokens} tokens; raise max_tokens") from None
        raise StructuredOutputError(
            f"response_format: constrained output is not JSON ({exc}): {text[:200]!r}") from None
    try:
        import jsonschema
    except ImportError:
        return value
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise StructuredOutputError(f"response_format: output failed validation ({exc.message})") from None
    return value


# -- limits (checked iteratively, before anything recurses) ---------------------------------

def _limits(schema: Any, depth: int = 0) -> list[str]:
    """Depth, repetition counts, empty choices, NUL in patterns and non-finite numbers."""
    problems: list[str] = []
    stack = [("$", schema, depth)]
    values = 0  # enum values seen
    while stack and len(problems) < 10:
        path, node, level = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            problems.append(f"{path}: {node} (not a JSON number)")
        if isinstance(node, (dict, list)) and level > MAX_DEPTH:
            problems.append(f"{path}: nested more than {MAX_DEPTH} levels deep")
            continue
        if isinstance(node, list):
            stack += [(f"{path}[{i}]", v, level + 1) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            continue
        for key in _REPEATS:
            value = node.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_REPEAT:
                problems.append(f"{path}: {key} {value} (at most {MAX_REPEAT} can be enforced; lower it or leave it out)")
        for key in ("enum", "anyOf"):
            if key in node and (not isinstance(node[key], list) or not node[key]):
                problems.append(f"{path}: {key} {json.dumps(node[key])[:60]} (must be a non-empty list: nothing "
                                "could match)")
        if isinstance(node.get("enum"), list):
            values += len(node["enum"])
            if values > MAX_ENUM_VALUES:
                problems.append(f"{path}: enum brings the schema's enum values to {values} (at most "
                                f"{MAX_ENUM_VALUES} can be enforced; use a pattern or fewer values)")
                break
        if "pattern" in node and (not isinstance(node["pattern"], str) or "\x00" in node["pattern"]):
            problems.append(f"{path}: pattern {node['pattern']!r} (must be a regular expression without NUL)")
        stack += [(f"{path}.{key}", value, level + 1) for key, value in node.items()]
    return problems


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
    if isinstance(kind, list):  # (an unknown type is refused before: see _malformed)
        return {"type"}, [], []
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
