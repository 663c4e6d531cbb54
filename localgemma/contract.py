"""The Workers AI gemma-lora contract: one pydantic model per input shape, and the output shape.

Every field, with its default and range, is declared here once; the Python API, the CLI and
the HTTP server all validate through `parse_inputs`. Unknown fields are refused by name.
`output` and `event` give a Result (and a streamed chunk) Workers AI's shape, for `run` and
the Workers AI routes alike.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)

from .errors import InvalidInput
from .jsontext import strict_json

if TYPE_CHECKING:
    from .generation import Chunk, Result

MAX_TEXT = 131072
SEED_MAX = 9999999999
MAX_STOP = 4  # stop strings, as OpenAI allows
ROLES = ("system", "user", "assistant", "model", "tool")


class _Strict(BaseModel):
    # strict: a string is not a number, nor a number a boolean ("0", true and 1 are refused where
    # a number, an integer and a boolean are due); Integer and Boolean below say the exceptions.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


def _whole(value: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2 (as in JavaScript and JSON Schema)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _said(value: Any) -> Any:
    """"true" and "false" as booleans: the Workers AI LoRA page's own example sends "raw": "true"."""
    return {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value


Integer = Annotated[int, BeforeValidator(_whole)]
Boolean = Annotated[bool, BeforeValidator(_said)]


class ResponseFormat(_Strict):
    type: Literal["json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


class FunctionSpec(_Strict):
    name: str = Field(min_length=1)
    description: Optional[str] = Field("", description="null or absent: no description")
    parameters: Optional[dict[str, Any]] = Field(None, description="null or absent: no arguments")
    # OpenAI's: its value does not matter here, every call is held to its schema by a grammar.
    strict: Optional[bool] = None

    @model_validator(mode="after")
    def _defaults(self) -> "FunctionSpec":
        self.description = self.description or ""
        if self.parameters is None:
            self.parameters = {"type": "object", "properties": {}}
        return self


class FlatTool(FunctionSpec):
    """Workers AI's flat tool shape: {name, description, parameters}."""


class FunctionTool(_Strict):
    """OpenAI's nested tool shape: {type: "function", function: {...}}."""

    type: Literal["function"] = "function"
    function: FunctionSpec


def _tool_shape(value: Any) -> str:
    """Which of the two shapes a tool is in: OpenAI's has "function" (errors then speak of it alone)."""
    return "FunctionTool" if isinstance(value, dict) and "function" in value else "FlatTool"


ToolShape = Annotated[Union[Annotated[FunctionTool, Tag("FunctionTool")], Annotated[FlatTool, Tag("FlatTool")]],
                      Discriminator(_tool_shape)]


class DeprecatedFunction(_Strict):
    name: str = Field(min_length=1)
    code: str


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CallFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: Union[dict[str, Any], str] = Field(default_factory=dict, description="an object, or one as JSON text")


class ToolCall(_Strict):
    """A call the assistant made, in Workers AI's flat shape {name, arguments} or OpenAI's
    {id, type: "function", function: {name, arguments}}."""

    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[CallFunction] = None
    name: Optional[str] = None
    arguments: Union[dict[str, Any], str, None] = None

    @model_validator(mode="after")
    def _one_shape(self) -> "ToolCall":
        if (self.function is None) == (self.name is None):
            raise ValueError("give either {name, arguments} or {type: 'function', function: {name, arguments}}")
        call = self.function or CallFunction(name=self.name, arguments=self.arguments or {})
        if isinstance(call.arguments, str):
            try:
                call.arguments = strict_json(call.arguments or "{}")
            except json.JSONDecodeError:
                raise ValueError(f"arguments must be a JSON object or its text, got {call.arguments[:60]!r}") from None
        if not isinstance(call.arguments, dict):
            raise ValueError(f"arguments must be a JSON object, got {call.arguments!r}")
        self.function, self.name, self.arguments = call, call.name, call.arguments
        return self


class Message(_Strict):
    role: str
    # A string, or (as the Cloudflare SDKs' types allow) a list of text parts; null only beside tool_calls.
    content: Union[str, list[TextPart], None] = Field(None, description="the text, at most 131072 characters")
    name: Optional[str] = None  # on a tool result: the tool's name
    tool_call_id: Optional[str] = None  # on a tool result: the call it answers
    tool_calls: Optional[list[ToolCall]] = None  # on an assistant turn: the calls it made

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") != "text":
                    raise ValueError(f"only text parts are accepted (Gemma 2B/7B take text only), got a part of "
                                     f"type {part.get('type')!r}")
        return content

    @model_validator(mode="after")
    def _text(self) -> "Message":
        if isinstance(self.content, list):
            self.content = "".join(part.text for part in self.content)
        if self.content is None and not self.tool_calls:
            raise ValueError("content: Field required (null only on an assistant turn with tool_calls)")
        self.content = self.content or ""
        if len(self.content) > MAX_TEXT:
            raise ValueError(f"content: String should have at most {MAX_TEXT} characters")
        if self.tool_calls and self.role not in ("assistant", "model"):
            raise ValueError(f"tool_calls: only an assistant turn makes calls, not a {self.role!r} one")
        return self


class _Common(_Strict):
    stream: Boolean = False
    max_tokens: Integer = Field(256, ge=1, description="tokens to generate at most; capped at what the context leaves")
    temperature: float = Field(0.6, ge=0, le=5, description="0 means greedy")
    top_p: Optional[float] = Field(None, ge=0, le=2, description=">= 1 means no truncation")
    top_k: Optional[Integer] = Field(None, ge=1, le=50)
    seed: Optional[Integer] = Field(None, ge=1, le=SEED_MAX)
    repetition_penalty: Optional[float] = Field(None, ge=0, le=2, description="1 (or 0) means off")
    frequency_penalty: Optional[float] = Field(None, ge=0, le=2)
    presence_penalty: Optional[float] = Field(None, ge=0, le=2)
    response_format: Optional[ResponseFormat] = None
    # Extension (OpenAI's): the text ends before the first of these (not returned); finish "stop".
    stop: Union[str, list[str], None] = Field(None, description=f"a string or up to {MAX_STOP} strings")
    raw: Boolean = False
    lora: Optional[str] = Field(None, min_length=1)
    image: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: Union[str, list[str], None]) -> Optional[list[str]]:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > MAX_STOP or not all(stops)):
            raise ValueError(f"give a non-empty string or up to {MAX_STOP} of them")
        return stops or None

    @field_validator("image")
    @classmethod
    def _no_vision(cls, image: Any) -> Any:
        if image is not None:
            raise ValueError("this model has no vision: Gemma 2B/7B take text only; remove the image field")
        return image


class PromptInputs(_Common):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)


class NamedFunction(_Strict):
    name: str = Field(min_length=1)


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class MessagesInputs(_Common):
    messages: list[Message] = Field(min_length=1)
    tools: Optional[list[ToolShape]] = None
    functions: Optional[list[DeprecatedFunction]] = None
    # Extension (OpenAI's): auto | none | required | {"type": "function", "function": {"name"}}
    tool_choice: Optional[Union[Literal["auto", "none", "required"], NamedToolChoice]] = None


Inputs = Union[PromptInputs, MessagesInputs]

FIELDS = sorted(set(PromptInputs.model_fields) | set(MessagesInputs.model_fields))
_FIELD_NAMES = set(FIELDS) | set(Message.model_fields) | set(ToolCall.model_fields)


def parse_inputs(data: Any) -> Inputs:
    """Validate a Workers AI inputs object; raise InvalidInput naming field, value and rule."""
    if isinstance(data, (PromptInputs, MessagesInputs)):
        return data
    if not isinstance(data, dict):
        raise InvalidInput(f"inputs must be a JSON object with 'prompt' or 'messages', got {type(data).__name__}")
    if "prompt" in data and "messages" in data:
        raise InvalidInput("inputs: give either 'prompt' or 'messages', not both")
    if "messages" in data:
        shape: type[BaseModel] = MessagesInputs
    elif "prompt" in data:
        shape = PromptInputs
        for field in ("tools", "functions"):
            if field in data:
                raise InvalidInput(f"{field}: only accepted with 'messages', not with 'prompt'")
    else:
        raise InvalidInput("inputs: 'prompt' (a string) or 'messages' (a list of {role, content}) is required")
    try:
        return shape.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe(exc, shape)) from None


def describe(exc: ValidationError, shape: type[BaseModel] | None = None) -> str:
    """One readable line per problem: `field: what is wrong (got VALUE)`."""
    return "; ".join(problems(exc.errors(), FIELDS, shape))


def problems(errors: list[dict], known: list[str], shape: type[BaseModel] | None = None) -> list[str]:
    """pydantic's (or FastAPI's) errors, one line each, naming the field: the one renderer.
    An unknown field is told the fields allowed where it is: those of `shape` at that place
    when a shape is given, else `known` (none: no list)."""
    lines = []
    for err in errors:
        where = _loc(err["loc"])
        if shape is not None and err["type"] == "extra_forbidden":
            known = fields_at(shape, err["loc"][:-1])
        if err["type"] == "extra_forbidden" and not known:
            lines.append(f"{where}: unknown or unsupported parameter")
        elif err["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else f"; allowed fields: {', '.join(known)}"
            lines.append(f"{where}: unknown field{hint}")
        elif err["type"] == "missing":
            lines.append(f"{where}: Field required")
        else:
            msg = _MODEL_CLASS.sub("a JSON object", err["msg"].removeprefix("Value error, "))
            field, sep, rest = msg.partition(": ")
            if sep and field.isidentifier() and isinstance(err.get("input"), dict) and field in _FIELD_NAMES:
                # a check of the whole object that is about one of its fields: name the field
                lines.append(f"{where}.{field}: {rest} (got {_show(err['input'].get(field))})")
            else:
                lines.append(f"{where}: {msg} (got {_show(err.get('input'))})")
    return lines


_MODEL_CLASS = re.compile(r"(?<=Input should be )a valid dictionary or instance of \w+")  # (strict mode's words)


def fields_at(shape: type[BaseModel], loc: tuple) -> list[str]:
    """The fields of the object at `loc` (a pydantic error's location, list indexes and union
    branch names included) inside `shape`; [] when it is not one object's."""
    import typing

    def models(annotation: Any) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models(arg)]

    here = [shape]
    for part in loc:
        if isinstance(part, int) or part in ("body", "form"):
            continue
        branch = [m for m in here if m.__name__ == part]  # a union's branch, by its class name
        if branch:
            here = branch
        elif any(part in m.model_fields for m in here):
            here = [c for m in here if part in m.model_fields for c in models(m.model_fields[part].annotation)]
        elif not str(part).startswith(("list[", "dict[", "function-", "json-or-python")):
            return []
    names = {name: None for m in here for name in m.model_fields}
    return list(names) if len(here) == 1 else sorted(names)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("body", "form", "FunctionTool", "FlatTool", "NamedToolChoice") or str(part).startswith(
                ("literal[", "function-", "json-or-python")):
            continue  # where FastAPI found it, and union branch names, mean nothing to a user
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _show(value: Any) -> str:
    if not isinstance(value, (str, int, float, bool, list, dict, tuple, type(None))):  # not from JSON
        return "a file" if hasattr(value, "filename") else f"a {type(value).__name__}"  # a multipart upload
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- outputs -------------------------------------------------------------------------------------

def output(result: "Result") -> dict[str, Any]:
    """Workers AI's answer: {"response", "usage"} (+ "tool_calls"). With a schema, "response"
    is the parsed value; with a tool call it is "" and the call is in "tool_calls"."""
    out: dict[str, Any] = {"response": result.value if result.has_value else ("" if result.tool_calls else result.text),
                           "usage": result.usage.to_dict()}
    if result.tool_calls:
        out["tool_calls"] = [dict(call) for call in result.tool_calls]
    return out


def event(item: "Chunk | Result") -> dict[str, Any]:
    """One streamed event: {"response": piece}; the last {"response": "", "usage"} (+
    "tool_calls", or with a schema "parsed": the value)."""
    from .generation import Result

    if not isinstance(item, Result):
        return {"response": item.text}
    out: dict[str, Any] = {"response": "", "usage": item.usage.to_dict()}
    if item.tool_calls:
        out["tool_calls"] = [dict(call) for call in item.tool_calls]
    elif item.has_value:
        out["parsed"] = item.value
    return out
