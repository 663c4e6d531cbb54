"""Tools: rendered into the Gemma prompt, and decoding constrained so the model either answers
in text or emits one call `{"name": ..., "arguments": {...}}` whose name is a tool's and whose
arguments validate against that tool's `parameters` schema.

Gemma has no tool-call tokens; the call is a JSON object, which the grammar makes well-formed.
The call grammar is llama.cpp's converter applied to an `anyOf` of one object schema per tool;
"text or a call" adds one rule: text is anything that does not start with "{".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from . import structured
from .errors import InvalidInput, StructuredOutputError
from .structured import grammar_for

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

PREAMBLE = (
    "You can use these tools. To call one, answer with only a JSON object "
    '{"name": "<tool name>", "arguments": {<arguments>}} and nothing else. '
    "Otherwise answer in plain text.\n\nTools:\n"
)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


def tools_of(inputs) -> list[Tool]:
    """Both `tools` shapes and the deprecated `functions`, checked: names unique and safe,
    parameters an object schema the grammar can enforce."""
    found = []
    for spec in inputs.tools or []:
        fn = getattr(spec, "function", spec)
        found.append(Tool(fn.name, fn.description, fn.parameters))
    for fn in inputs.functions or []:
        # Workers AI's deprecated functions carry code, not a schema: any arguments object.
        found.append(Tool(fn.name, f"(function; code: {fn.code[:200]})", {"type": "object"}))
    seen = set()
    for i, tool in enumerate(found):
        where = f"tools[{i}]"
        if not NAME_RE.fullmatch(tool.name):
            raise InvalidInput(f"{where}.name: {tool.name!r} is not allowed; use 1-64 letters, digits, '_' or '-'")
        if tool.name in seen:
            raise InvalidInput(f"{where}.name: {tool.name!r} is defined twice; tool names must be unique")
        seen.add(tool.name)
        if tool.parameters.get("type", "object") != "object":
            raise InvalidInput(f"{where}.parameters.type: {tool.parameters.get('type')!r}; tool parameters must be "
                               f"an object schema ({{\"type\": \"object\", \"properties\": ...}})")
        # The same gate as response_format; nested two levels deep in the call schema.
        structured.check(tool.parameters, f"{where}.parameters ({tool.name})", depth=2)
    return found


def choice_of(tool_choice: Any, tools: list[Tool]) -> tuple[str, Optional[str]]:
    """OpenAI's tool_choice -> (mode, function name): auto, none, required or one named tool."""
    if tool_choice is None:
        return ("auto", None)
    if isinstance(tool_choice, str):
        return (tool_choice, None)
    name = tool_choice.function.name
    if name not in {t.name for t in tools}:
        raise InvalidInput(f"tool_choice.function.name: {name!r} is not one of the tools "
                           f"({', '.join(t.name for t in tools)})")
    return ("function", name)


def render(tools: list[Tool]) -> str:
    """The tool block that goes in front of the first user turn."""
    lines = [json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters})
             for t in tools]
    return PREAMBLE + "\n".join(lines)


def call_schema(tools: list[Tool]) -> dict:
    """One object schema per tool, {name, arguments}; each tool's local definitions ($defs, as
    pydantic writes nested models) moved to the root, where its references now point."""
    defs: dict[str, Any] = {}
    calls = []
    for t in tools:
        parameters, own = _hoisted(t.parameters, t.name)
        defs.update(own)
        calls.append({"type": "object", "properties": {"name": {"const": t.name}, "arguments": parameters},
                      "required": ["name", "arguments"], "additionalProperties": False})
    return {"anyOf": calls, **({"$defs": defs} if defs else {})}


_LOCAL = re.compile(r"#/(\$defs|definitions)/(.+)")


def _hoisted(parameters: dict, name: str) -> tuple[dict, dict]:
    """`parameters` without its $defs / definitions, references into them renamed `NAME.KEY`
    under the root's $defs; and those definitions, renamed."""
    def renamed(node: Any) -> Any:
        if isinstance(node, list):
            return [renamed(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: renamed(v) for k, v in node.items() if k not in ("$defs", "definitions")}
        ref = node.get("$ref")
        match = _LOCAL.fullmatch(ref) if isinstance(ref, str) else None
        if match:
            out["$ref"] = f"#/$defs/{name}.{match.group(2)}"
        return out

    own = {**parameters.get("definitions", {}), **parameters.get("$defs", {})}
    return renamed(parameters), {f"{name}.{key}": renamed(value) for key, value in own.items()}


def grammar(tools: list[Tool], mode: str, name: Optional[str], answer: Optional[dict] = None) -> Optional[str]:
    """GBNF for the reply: a call (required / named), text or a call (auto), or None (none).
    `answer`: the response_format's schema, which a reply that is not a call then follows (auto)."""
    if mode == "none":
        return None
    if answer is not None:  # sound whatever the mode, though only auto can answer by it
        answer = structured.check(answer)
    chosen = [t for t in tools if t.name == name] if mode == "function" else tools
    if mode == "auto" and answer is not None:
        answer, own = _hoisted(answer, "response_format")
        schema = call_schema(chosen)
        schema["anyOf"].append(answer)
        schema["$defs"] = {**schema.get("$defs", {}), **own}
        return grammar_for(schema, "tools")
    call = grammar_for(call_schema(chosen), "tools")
    if mode in ("required", "function"):
        return call
    # auto: rename the converter's root to `call`, then offer text as the alternative.
    call = re.sub(r"^root ::=", "call ::=", call, flags=re.M)
    return call + '\nroot ::= call | text\ntext ::= [^{] [^\\x00]*\n'


def is_call(text: str) -> bool:
    """Whether a reply is a call: by the grammar, a call's first character is "{" and text's
    never is. One character decides, so a stream can send text as it comes."""
    return text.startswith("{")


def parse_call(text: str, tools: list[Tool], mode: str, cut: Optional[int] = None,
               answer: bool = False) -> Optional[dict]:
    """The call in a reply, as {"name", "arguments"}; None when the reply is text. `cut`: the
    max_tokens that ended the reply, if it ended there. `answer`: a response_format is given,
    so in auto mode a JSON reply that is not a call is the answer (structured.parse's to judge,
    cut short or not)."""
    either = answer and mode == "auto"
    if mode == "none" or not is_call(text):
        if mode in ("required", "function"):
            raise StructuredOutputError("tools: the reply was not a tool call (was max_tokens too small?)")
        return None
    try:
        call = json.loads(text.strip())
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        if either:
            return None
        if cut is not None:
            raise StructuredOutputError(f"max_tokens: the tool call was not finished within {cut} tokens; "
                                        "raise max_tokens") from None
        raise StructuredOutputError(f"tools: the tool call is malformed ({exc})") from None
    if either and not (isinstance(call, dict) and set(call) == {"name", "arguments"}
                       and call["name"] in {t.name for t in tools}):
        return None
    tool = next((t for t in tools if t.name == call.get("name")), None)
    if tool is None:
        raise StructuredOutputError(f"tools: the call names {call.get('name')!r}, which is not a tool")
    try:
        import jsonschema

        jsonschema.validate(call["arguments"], tool.parameters)
    except ImportError:
        pass
    except jsonschema.ValidationError as exc:
        raise StructuredOutputError(f"tools: arguments for {tool.name} failed validation ({exc.message})") from None
    return {"name": call["name"], "arguments": call["arguments"]}
