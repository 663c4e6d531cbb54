"""Ollama's HTTP API over the same runtime, for the clients that speak it (the `ollama`
package, Open WebUI, and everything else pointed at an Ollama base URL).

    POST /api/generate    prompt (+ system, raw) -> reply; NDJSON stream unless stream: false
    POST /api/chat        messages (+ tools, tool results) -> reply
    GET  /api/tags        every served model as NAME:latest, each ready finetune as NAME:FINETUNE
    POST /api/show        one model: its GGUF header (model_info), details, template, parameters
    GET  /api/ps          the models loaded in this process
    GET  /api/version
    pull, push, create, delete, copy, blobs, embed, embeddings: 501, naming the localgemma
                          command that does it (or saying it is not offered)

Names are Ollama's `name:tag`: a served id's last path component is its name
(`@cf/google/gemma-2b-it-lora` -> `gemma-2b-it-lora`), the full id works too; the tag `latest`
is the base and any other tag a finetune of that base (the contract's `lora`). Each request is
translated into the Workers AI contract in one function (`generate_fields`, `chat_fields`,
`translate_options`); what the contract cannot honour is refused with a 400 naming it, never
ignored, except the runner options that change how the answer is computed, not what it is.
The contract's defaults stay (temperature 0.6, 256 tokens), not Ollama's.

Errors take Ollama's shape `{"error": "..."}` (server/errors.py); a stream that fails after it
started ends with such a line, as Ollama's does.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import math
import re
import secrets
import string
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Literal, Optional, Union

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.types import Send

from localgemma import finetunes
from localgemma.contract import FunctionTool, Inputs, PromptInputs, parse_inputs, problems
from localgemma.errors import (IncompleteRequest, InternalError, InvalidInput, LocalGemmaError, NotOffered,
                               UnknownModel, Unsupported)
from localgemma.generation import Chunk, Result, TokenLogprob

from .errors import public_text, worded
from .errors import renamed as renamed_in
from .jsonbody import parse_json
from .queue import END, Job
from .served import servable
from .sse import SEND_TIMEOUT, begin, client_gone, unless_disconnected

# The Ollama release whose API this follows (tools, structured outputs, tool_name, logprobs):
# clients that check /api/version before using a feature see one that has them all.
API_VERSION = "0.12.11"
LATEST = "latest"
NDJSON = "application/x-ndjson"
FILL_CONTEXT = (-1, -2)  # num_predict: Ollama's "until the context is full"
NEVER = "9999-12-31T23:59:59Z"  # /api/ps expires_at: models stay loaded for the server's life
TEMPLATE = ('{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
            "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n")
log = logging.getLogger("localgemma.server")


def make_router() -> APIRouter:
    router = APIRouter(tags=["Ollama"])
    router.add_api_route("/api/generate", generate, methods=["POST"])
    router.add_api_route("/api/chat", chat, methods=["POST"])
    router.add_api_route("/api/tags", tags, methods=["GET", "HEAD"])
    router.add_api_route("/api/show", show, methods=["POST"])
    router.add_api_route("/api/ps", ps, methods=["GET"])
    router.add_api_route("/api/version", version, methods=["GET", "HEAD"])
    # Ollama's liveness check; GET / stays the playground page.
    router.add_api_route("/", running, methods=["HEAD"], include_in_schema=False)
    for method, path in NOT_OFFERED:
        router.add_api_route(path, not_offered, methods=[method], include_in_schema=False)
    return router


# -- the wire: Ollama's request bodies (unknown fields are refused by name) ----------------------

class _Wire(BaseModel):
    # strict: "2", 0 and true are not what a number or a boolean field takes
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


_DURATION = re.compile(r"-?(\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))*")


class _Request(_Wire):
    model: str = Field("", description="NAME[:TAG] (GET /api/tags), or a served model id")
    # Any: these take one of several types, and a union's errors would name its branches;
    # format_field, _duration and _refuse_common say what is allowed in one line instead.
    format: Any = Field(None, description='"json", or a JSON schema object')
    options: Optional[dict[str, Any]] = None
    stream: Optional[bool] = Field(None, description="missing means true (NDJSON)")
    keep_alive: Any = Field(None, description="seconds or a duration ('5m'); accepted and ignored: models stay loaded")
    think: Any = Field(None, description="false, or left out: Gemma does not think")
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    truncate: Optional[bool] = None
    shift: Optional[bool] = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (value is None or number or (isinstance(value, str) and (value == "0" or _DURATION.fullmatch(value)))):
            raise ValueError("a number of seconds or a duration such as '5m', '1h30m', '0' or '-1s'")
        return value


class GenerateRequest(_Request):
    prompt: Optional[str] = None
    system: Optional[str] = None
    raw: Optional[bool] = None
    # Declared so that they can be refused with a reason (see `_refuse_generate`).
    suffix: Optional[str] = None
    template: Optional[str] = None
    context: Optional[list[int]] = None
    images: Optional[list[Any]] = None
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None


class CallFunction(_Wire):
    name: str = Field(min_length=1)
    arguments: Union[dict[str, Any], str] = Field(default_factory=dict)
    index: Optional[int] = None


class ToolCall(_Wire):
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: CallFunction


class ChatMessage(_Wire):
    role: str
    content: Optional[str] = Field(None, description="missing means empty (the ollama client drops empty fields)")
    thinking: Optional[str] = Field(None, description="on history turns: not shown to Gemma (it does not think)")
    images: Optional[list[Any]] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_name: Optional[str] = None
    tool_call_id: Optional[str] = None

    @field_validator("role", mode="before")
    @classmethod
    def _lower(cls, role: Any) -> Any:
        return role.lower() if isinstance(role, str) else role


class ChatRequest(_Request):
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[FunctionTool]] = Field(None, description='[{"type": "function", "function": {name, '
                                                                  'description, parameters}}]')


class ShowRequest(_Wire):
    model: Optional[str] = None
    name: Optional[str] = Field(None, description="the older spelling of model")
    verbose: Optional[bool] = None


def _validate(shape: type[BaseModel], data: Any) -> Any:
    """The body as `shape`, or InvalidInput naming every field at fault."""
    if not isinstance(data, dict):
        raise InvalidInput(f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return shape.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput("; ".join(problems(exc.errors(), [], shape))) from None


async def _body(request: Request, shape: type[BaseModel]) -> Any:
    """The JSON body, whatever its Content-Type: Ollama's own curl examples send JSON with
    curl's default form type."""
    raw = await request.body()
    if not raw.strip():
        raise IncompleteRequest("missing request body; send a JSON object, e.g. {\"model\": \"gemma-3-270m\", ...}")
    return _validate(shape, parse_json(raw))


# -- names: Ollama's name:tag <-> served ids and finetunes -----------------------------------------

def ollama_name(model_id: str) -> str:
    """A served id's Ollama name: its last path component."""
    return model_id.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Target:
    """What an Ollama name runs: a served model id, and the finetune its tag names (None: latest)."""

    model_id: str
    finetune: Optional[finetunes.Finetune] = None

    @property
    def lora(self) -> Optional[str]:
        return self.finetune.name if self.finetune else None


class Names:
    """The served ids and their finetunes, as Ollama names. Two served ids with the same last
    component would make the short name ambiguous: both are then named by their full ids."""

    def __init__(self, served: Iterable[str], entries: Iterable[finetunes.Finetune] = (), catalog: Iterable[str] = ()):
        self.served = list(served)
        self.catalog = [c for c in catalog if c not in self.served]  # known ids this server does not run
        self.entries = [e for e in entries if e.model in self.served]
        counts: dict[str, int] = {}
        for model_id in self.served:
            counts[ollama_name(model_id)] = counts.get(ollama_name(model_id), 0) + 1
        self.name_of = {m: ollama_name(m) if counts[ollama_name(m)] == 1 else m for m in self.served}
        self.by_name = {name: m for m, name in self.name_of.items()}

    def resolve(self, name: str) -> Target:
        """`NAME`, `NAME:TAG`, `ID` or `ID:TAG` -> Target; UnknownModel (404) saying what is served."""
        base, tag = name, LATEST
        if name not in self.served and name not in self.by_name:
            head, sep, tail = name.rpartition(":")
            if sep and head and "/" not in tail:
                base, tag = head, tail or LATEST
        model_id = base if base in self.served else self.by_name.get(base)
        if model_id is None:
            known = next((c for c in self.catalog if base in (c, ollama_name(c))), None)
            raise self.unknown(name, f"{known} is in the catalog but not served here" if known else "")
        if tag == LATEST:
            return Target(model_id)
        entry = next((e for e in self.entries if e.model == model_id and tag in (e.name, e.id)), None)
        if entry is None:
            raise self.unknown(name, f"{self.name_of[model_id]} has no finetune {tag!r}")
        return Target(model_id, entry)

    def unknown(self, name: str, why: str = "") -> UnknownModel:
        served = ", ".join(f"{n}:{LATEST}" for n in self.by_name) or "nothing"
        return UnknownModel(f"model {json.dumps(name)} not found{f' ({why})' if why else ''}, this server serves "
                            f"{served} and their finetunes as NAME:FINETUNE (GET /api/tags lists them); a model is "
                            "served with localgemma serve --model ID=PATH or localgemma models pull ID")

    def listing(self) -> list[tuple[str, Target]]:
        """Every runnable name: each base as NAME:latest, each ready finetune as NAME:FINETUNE."""
        out = [(f"{self.name_of[m]}:{LATEST}", Target(m)) for m in self.served]
        out += [(f"{self.name_of[e.model]}:{e.name}", Target(e.model, e)) for e in self.entries if e.status == "ready"]
        return out


def _names() -> Names:
    from localgemma.models import CATALOG

    return Names(servable(), finetunes.list_finetunes(), CATALOG)


async def _target(name: str) -> Target:
    if not name:
        raise IncompleteRequest("model is required: give a name from GET /api/tags, e.g. gemma-3-270m:latest",
                                param="model")
    names = await anyio.to_thread.run_sync(_names)
    return names.resolve(name)


# -- options: Ollama's sampling and runner options -> the contract ---------------------------------

MAPPED = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed",
          "num_predict": "max_tokens", "repeat_penalty": "repetition_penalty",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "stop": "stop"}
# Values that mean "off" in Ollama, where the contract's way to say it is to leave the field out.
OFF = {"top_k": (0,), "seed": (-1,)}
# Sampling with no equivalent here: accepted only at the value that turns it off.
NEUTRAL = {"min_p": 0, "typical_p": 1, "tfs_z": 1, "mirostat": 0}
# Parameters of something that is off: accepted, with no effect, while it is off.
MIROSTAT_ONLY = {"mirostat_tau": float, "mirostat_eta": float}
PENALTY_ONLY = {"repeat_last_n": int, "penalize_newline": bool}
# How the runner computes, not what it answers: type-checked, then ignored.
RUNNER = {"num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "num_thread": int, "num_keep": int,
          "draft_num_predict": int, "use_mmap": bool, "use_mlock": bool, "numa": bool, "low_vram": bool,
          "f16_kv": bool}
OPTIONS = sorted({*MAPPED, *NEUTRAL, *MIROSTAT_ONLY, *PENALTY_ONLY, *RUNNER})
PENALTIES = ("repeat_penalty", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class Options:
    """`options` translated: the contract fields they set, and what can only be checked once
    the model is loaded (num_ctx against its context; num_predict -1/-2 fill it)."""

    fields: dict[str, Any]
    num_ctx: Optional[int] = None
    fill_context: bool = False

    def settle(self, inputs: Inputs, n_ctx: int) -> Inputs:
        if self.num_ctx is not None and self.num_ctx > n_ctx:
            raise Unsupported(f"options.num_ctx: {self.num_ctx} is more than the context this server runs the model "
                              f"with ({n_ctx} tokens); send at most {n_ctx} (the server's context is set with "
                              "LOCALGEMMA_N_CTX)", param="options.num_ctx")
        return inputs.model_copy(update={"max_tokens": n_ctx}) if self.fill_context else inputs


def translate_options(options: Optional[dict[str, Any]]) -> Options:
    """Ollama's `options` -> contract fields; a 400 naming the option, its value and what is
    allowed for anything that cannot be honoured."""
    options = options or {}
    for name in options:
        if name not in OPTIONS:
            guess = difflib.get_close_matches(name, OPTIONS, n=1)
            hint = f"did you mean '{guess[0]}'?" if guess else f"known options: {', '.join(OPTIONS)}"
            raise Unsupported(f"options.{name}: unknown option; {hint}", param=f"options.{name}")
    fields: dict[str, Any] = {}
    fill = options.get("num_predict") in FILL_CONTEXT and not isinstance(options.get("num_predict"), bool)
    for name, field in MAPPED.items():
        value = options.get(name)
        if value is None or (name in OFF and value in OFF[name] and not isinstance(value, bool)) or (
                name == "num_predict" and fill):
            continue
        _check_option(name, field, value)
        fields[field] = value
    for name, value in options.items():
        if name in NEUTRAL:
            _neutral(name, value)
        elif name in MIROSTAT_ONLY:
            _typed(name, value, float)
            if options.get("mirostat") not in (None, 0):
                _neutral("mirostat", options["mirostat"])
        elif name in PENALTY_ONLY:
            _typed(name, value, PENALTY_ONLY[name])
            if _penalised(options) and not (name == "penalize_newline" and value is True):
                raise Unsupported(f"options.{name}: {value!r} cannot be honoured: the penalties here count every "
                                  "token of this reply so far (newlines included, the prompt not); leave "
                                  f"{name} out, or turn the penalties off", param=f"options.{name}")
        elif name in RUNNER:
            _typed(name, value, RUNNER[name])
            if name == "num_ctx" and value < 1:
                raise InvalidInput(f"options.num_ctx: {value}; expected at least 1 token", param="options.num_ctx")
    return Options(fields, options.get("num_ctx"), fill)


def _check_option(name: str, field: str, value: Any) -> None:
    """The contract's own validation of `field`, its message naming the Ollama option."""
    try:
        PromptInputs.model_validate({"prompt": "-", field: value})
    except ValidationError as exc:
        errors = [{**err, "loc": ("options", name, *err["loc"][1:])} for err in exc.errors()]
        allowed = _allowed(name, field)
        raise InvalidInput("; ".join(problems(errors, [])) + (f"; allowed: {allowed}" if allowed else ""),
                           param=f"options.{name}") from None


def _allowed(name: str, field: str) -> str:
    """The contract field's range, as words."""
    info = PromptInputs.model_fields[field]
    low = next((m.ge for m in info.metadata if getattr(m, "ge", None) is not None), None)
    high = next((m.le for m in info.metadata if getattr(m, "le", None) is not None), None)
    extra = {"num_predict": ", or -1 / -2 (until the context is full)", "seed": ", or -1 (random)",
             "top_k": ", or 0 (off)"}.get(name, "")
    if low is not None and high is not None:
        return f"{low} to {high}{extra}"
    if low is not None:
        return f"at least {low}{extra}"
    return info.description or ""


def _typed(name: str, value: Any, kind: type) -> None:
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}[kind]
    if not ok:
        words = {bool: "true or false", int: "a whole number", float: "a number"}[kind]
        raise InvalidInput(f"options.{name}: must be {words} (got {json.dumps(value)[:60]})", param=f"options.{name}")


def _neutral(name: str, value: Any) -> None:
    off = NEUTRAL[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != off:
        raise Unsupported(f"options.{name}: {json.dumps(value)[:60]} cannot be honoured: this server has no {name} "
                          f"sampling; leave it out or send {off} (off)", param=f"options.{name}")


def _penalised(options: dict[str, Any]) -> bool:
    """Whether any penalty is on (a repeat_penalty of 1 or 0 is off, as the contract has it; 0 for the others)."""
    return any(options.get(p) not in ((None, 0, 1) if p == "repeat_penalty" else (None, 0)) for p in PENALTIES)


# -- translation: Ollama request -> contract inputs ------------------------------------------------

def format_field(value: Any) -> Optional[dict[str, Any]]:
    """`format` -> the contract's response_format: "json" any object, a dict a JSON schema."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": value}
    raise InvalidInput(f'format: {json.dumps(value)[:60]} is not accepted; send "json" or a JSON schema object',
                       param="format")


def _refuse_common(req: _Request, name: str) -> None:
    if req.think is not None and req.think is not False:
        if req.think is True or req.think in ("low", "medium", "high", "max"):
            raise Unsupported(f'think: "{name}" does not support thinking; leave think out or send false',
                              param="think")
        raise InvalidInput(f"think: {req.think!r}; expected true, false, 'low', 'medium', 'high' or 'max'",
                           param="think")
    if req.truncate:
        raise Unsupported("truncate: true cannot be honoured: a prompt too long for the context is refused here, "
                          "never cut; send false or leave it out", param="truncate")
    if req.shift:
        raise Unsupported("shift: true cannot be honoured: generation stops where the context is full "
                          "(done_reason \"length\"), the context is never shifted; send false or leave it out",
                          param="shift")
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= 20:
            raise InvalidInput(f"top_logprobs must be between 0 and 20 (got {req.top_logprobs})", param="top_logprobs")
        if not req.logprobs:
            raise InvalidInput("top_logprobs: needs logprobs: true", param="top_logprobs")


def _refuse_generate(req: GenerateRequest) -> None:
    for field, why in (("suffix", "text after the insertion point (fill-in-the-middle) is not available: Gemma "
                                  "2B/7B and Gemma 3 270M have no infill mode"),
                       ("template", "the template is Gemma's own, rendered by localgemma; for a format of your own "
                                    "send raw: true with the prompt written out"),
                       ("context", "the context token list (deprecated in Ollama) is not kept here; send the "
                                   "conversation to /api/chat, or the whole text with raw: true"),
                       ("images", "these models take text only (no vision)")):
        if getattr(req, field):
            raise Unsupported(f"{field}: {why}", param=field)
    for field in ("width", "height", "steps"):
        if getattr(req, field) is not None:
            raise Unsupported(f"{field}: image generation is not available; these models generate text",
                              param=field)
    if req.raw and req.system:
        raise InvalidInput("raw mode does not support template, system, or context (system: in raw mode the "
                           "prompt goes to the model as written; write the system text into it)", param="system")


def generate_fields(req: GenerateRequest, target: Target) -> dict[str, Any]:
    """A generate request as contract inputs (without options)."""
    _refuse_generate(req)
    if req.raw:
        fields: dict[str, Any] = {"prompt": req.prompt, "raw": True}
    elif req.system:
        fields = {"messages": [{"role": "system", "content": req.system}, {"role": "user", "content": req.prompt}]}
    else:
        fields = {"prompt": req.prompt}
    return _with(fields, req, target)


def chat_fields(req: ChatRequest, target: Target) -> dict[str, Any]:
    """A chat request as contract inputs (without options)."""
    messages = req.messages or []
    if messages and messages[-1].role == "assistant":
        raise Unsupported(f"messages[{len(messages) - 1}]: the conversation ends with an assistant turn, which "
                          "Ollama continues (prefill); this server does not: end with a user or tool turn",
                          param="messages")
    fields: dict[str, Any] = {"messages": [_message(i, m) for i, m in enumerate(messages)]}
    if req.tools:  # beside a format, as /v1 has it: a reply that is not a call follows the format
        fields["tools"] = [tool.model_dump(exclude_none=True) for tool in req.tools]
    return _with(fields, req, target)


def _with(fields: dict[str, Any], req: _Request, target: Target) -> dict[str, Any]:
    response_format = format_field(req.format)
    if response_format:
        fields["response_format"] = response_format
    if target.lora:
        fields["lora"] = target.lora
    return fields


def _message(i: int, m: ChatMessage) -> dict[str, Any]:
    """One Ollama message as a contract message: tool_name is the tool result's name, calls
    go in the contract's OpenAI shape (Ollama's `index` has no meaning in a history)."""
    where = f"messages[{i}]"
    if m.role not in ("system", "user", "assistant", "tool"):
        raise InvalidInput(f"{where}.role: {m.role!r}; expected system, user, assistant or tool", param="messages")
    if m.images:
        raise Unsupported(f"{where}.images: these models take text only (no vision); remove the images",
                          param="messages")
    if m.tool_calls and m.role != "assistant":
        raise InvalidInput(f"{where}.tool_calls: only an assistant turn makes calls, not a {m.role!r} one",
                           param="messages")
    out: dict[str, Any] = {"role": m.role, "content": m.content or ""}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in m.tool_calls]
    if m.role == "tool":
        out.update({k: v for k, v in (("name", m.tool_name), ("tool_call_id", m.tool_call_id)) if v})
    return out


def _parse(fields: dict[str, Any], options: Options) -> Inputs:
    """Contract inputs, always streamed from the runtime: the event loop sees the first token
    arrive, which is what splits prompt evaluation from generation in the metrics."""
    with ollama_words():
        return parse_inputs({**fields, **options.fields, "stream": True})


_CONTRACT_WORDS = (("response_format.json_schema", "format"), ("response_format", "format"),
                   ("max_tokens", "options.num_predict"), ("repetition_penalty", "options.repeat_penalty"),
                   ("lora", "model"))


def ollama_words():
    """Within this block errors say what the Ollama request calls the fields (`format: ...`)."""
    return worded(_CONTRACT_WORDS)


def renamed(message: str) -> str:
    return renamed_in(message, _CONTRACT_WORDS)


# -- answers: the runtime's items -> Ollama's objects ---------------------------------------------

def now_rfc3339() -> str:
    """Go's time.Now().UTC() as JSON: RFC 3339, UTC, with the fraction."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}  # Ollama's: a call ends with "stop"


@dataclass
class Timer:
    """Ollama's metrics, in nanoseconds, from the server's monotonic clock: load is waiting for
    the model to be loaded, prompt evaluation runs from the job's start to its first text (so it
    includes the first token), generation from there to the end. A reply that never streams
    text (a tool call, held until complete) counts all its time as generation."""

    arrived: float
    load_ns: int = 0
    started: float = 0.0
    first: Optional[float] = None

    def saw(self, chunk: Chunk) -> None:
        if self.first is None and chunk.text:
            self.first = time.monotonic()

    def metrics(self, result: Result) -> dict[str, int]:
        ended = time.monotonic()
        first = self.first if self.first is not None else self.started
        ns = lambda seconds: max(0, int(seconds * 1e9))  # noqa: E731
        return {"total_duration": ns(ended - self.arrived), "load_duration": self.load_ns,
                "prompt_eval_count": result.usage.prompt_tokens, "prompt_eval_duration": ns(first - self.started),
                "eval_count": result.usage.completion_tokens, "eval_duration": ns(ended - first)}


@dataclass
class Reply:
    """The objects of one answer, generate's or chat's."""

    kind: Literal["generate", "chat"]
    model: str  # as the request named it (Ollama echoes it)
    logprobs: bool = False

    def head(self, text: str) -> dict[str, Any]:
        body = {"response": text} if self.kind == "generate" else {"message": {"role": "assistant", "content": text}}
        return {"model": self.model, "created_at": now_rfc3339(), **body}

    def piece(self, chunk: Chunk) -> dict[str, Any]:
        out = {**self.head(chunk.text), "done": False}
        if self.logprobs:
            out["logprobs"] = [_logprob(e) for e in chunk.logprobs]
        return out

    def calls(self, result: Result) -> dict[str, Any]:
        out = {**self.head(""), "done": False}
        out["message"]["tool_calls"] = tool_calls(result.tool_calls)
        return out

    def done(self, result: Result, timer: Timer, whole: bool = False) -> dict[str, Any]:
        text = result.text if whole and not result.tool_calls else ""
        out = {**self.head(text), "done": True, "done_reason": DONE_REASONS.get(result.finish_reason, "stop"),
               **timer.metrics(result)}
        if whole and result.tool_calls:
            out["message"]["tool_calls"] = tool_calls(result.tool_calls)
        if whole and self.logprobs:
            out["logprobs"] = [_logprob(e) for e in result.logprobs]
        return out

    def loaded(self) -> dict[str, Any]:
        """Ollama's answer to an empty prompt (or no messages): the model is loaded, nothing generated."""
        return {**self.head(""), "done": True, "done_reason": "load"}


def tool_calls(calls: tuple[dict, ...]) -> list[dict[str, Any]]:
    """Ollama's shape: arguments an object, index inside function, id call_ + 8 of [a-z0-9]."""
    alphabet = string.ascii_lowercase + string.digits
    return [{"id": "call_" + "".join(secrets.choice(alphabet) for _ in range(8)),
             "function": {"index": i, "name": c["name"], "arguments": c.get("arguments", {})}}
            for i, c in enumerate(calls)]


def _logprob(entry: TokenLogprob) -> dict[str, Any]:
    out: dict[str, Any] = {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes)}
    if entry.top:
        out["top_logprobs"] = [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in entry.top]
    return out


def line(obj: Any) -> bytes:
    """One NDJSON line. ASCII only: httpx (the ollama client) splits lines like str.splitlines,
    so a raw U+2028 or U+0085 inside a string would cut an object in two."""
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


class NDJSONResponse(StreamingResponse):
    """A stream of lines that stops its job however it ends: finished, failed, or the client gone
    (Starlette cancels the body when the client disconnects) or not reading for SEND_TIMEOUT."""

    media_type = NDJSON

    def __init__(self, lines: AsyncIterator[bytes], job: Job):
        super().__init__(lines, media_type=NDJSON)
        self.job = job

    async def stream_response(self, send: Send) -> None:
        first = True

        async def timed(message) -> None:
            nonlocal first
            with anyio.fail_after(SEND_TIMEOUT):
                await send(message)
            if first and message["type"] == "http.response.body":
                first = False
                self.job.sent_first()  # its first line is written (see Job)

        try:
            await super().stream_response(timed)
        except TimeoutError:
            log.warning("a client stopped reading its stream for %s s; dropped", SEND_TIMEOUT)
        finally:
            self.job.cancel()


async def _lines(reply: Reply, first: Any, job: Job, timer: Timer) -> AsyncIterator[bytes]:
    """The stream: a line per piece of text, a tool call's line, the done line; a failure after
    the first line is one last `{"error": ...}` line (the 200 is sent by then)."""
    try:
        item = first
        while isinstance(item, Chunk):
            timer.saw(item)
            if item.text or (reply.logprobs and item.logprobs):
                yield line(reply.piece(item))
            item = await job.get()
        if item is END:
            raise client_gone()
        if reply.kind == "chat" and item.tool_calls:
            yield line(reply.calls(item))
        yield line(reply.done(item, timer))
    except Exception as exc:  # noqa: BLE001 - mid-stream: say it in the stream
        error = exc if isinstance(exc, LocalGemmaError) else InternalError(f"generation failed ({type(exc).__name__})")
        log.warning("stream failed after its first line: %s", error.message)
        yield line({"error": public_text(renamed(error.message))})
    finally:
        job.cancel()


async def _whole(first: Any, job: Job, timer: Timer) -> Result:
    try:
        item = first
        while isinstance(item, Chunk):
            timer.saw(item)
            item = await job.get()
        if item is END:
            raise client_gone()
        return item
    finally:
        job.cancel()


def _load(runtime: Any, model_id: str) -> tuple[int, int]:
    """Load the model (at once if it is already) -> (nanoseconds it took, its context)."""
    start = time.monotonic()
    runtime.load(model_id)
    took = int((time.monotonic() - start) * 1e9)
    return took, runtime.engine(model_id).n_ctx


async def _answer(request: Request, reply: Reply, target: Target, inputs: Inputs, options: Options,
                  logprobs: Optional[int], stream: bool, timer: Timer) -> Response:
    with ollama_words():
        timer.load_ns, n_ctx = await anyio.to_thread.run_sync(_load, request.app.state.runtime, target.model_id)
        inputs = options.settle(inputs, n_ctx)
        job, first = await begin(request, request.app.state.scheduler, target.model_id, inputs, hold_first=stream,
                                 logprobs=logprobs)
        timer.started = job.stats.started_at or time.monotonic()
        if stream:
            return NDJSONResponse(_lines(reply, first, job, timer), job)
        result = await unless_disconnected(request, lambda: _whole(first, job, timer))
        return JSONResponse(reply.done(result, timer, whole=True))


async def _loaded(request: Request, reply: Reply, target: Target) -> JSONResponse:
    await anyio.to_thread.run_sync(_load, request.app.state.runtime, target.model_id)
    return JSONResponse(reply.loaded())


# -- routes: generate and chat -----------------------------------------------------------------

async def generate(request: Request) -> Response:
    """Ollama's /api/generate: a prompt (templated, or raw) -> text."""
    return await _generation(request, "generate", GenerateRequest, generate_fields, lambda req: req.prompt)


async def chat(request: Request) -> Response:
    """Ollama's /api/chat: messages (and tools) -> an assistant message."""
    return await _generation(request, "chat", ChatRequest, chat_fields, lambda req: req.messages)


async def _generation(request: Request, kind: str, model: type, to_fields, given) -> Response:
    """Both doors: parse, pick the target, translate; no prompt or messages only loads the model."""
    timer = Timer(time.monotonic())
    req = await _body(request, model)
    target = await _target(req.model)
    _refuse_common(req, req.model)
    fields = to_fields(req, target)
    options = translate_options(req.options)
    reply = Reply(kind, req.model, bool(req.logprobs))
    if not given(req):
        return await _loaded(request, reply, target)
    inputs = _parse(fields, options)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return await _answer(request, reply, target, inputs, options, logprobs, req.stream is not False, timer)


# -- routes: models --------------------------------------------------------------------------

@dataclass(frozen=True)
class Facts:
    """What /api/tags and /api/show say about a model file, from its GGUF header."""

    size: int
    modified: float
    mtime_ns: int
    arch: str = ""
    parameters: int = 0
    quantization: str = "unknown"
    info: tuple[tuple[str, Any], ...] = ()  # scalar metadata; arrays as None

    @property
    def model_info(self) -> dict[str, Any]:
        return {**dict(self.info), "general.parameter_count": self.parameters}


def facts(path: Optional[Path]) -> Optional[Facts]:
    """A model file's facts (header read once per version of the file: it takes ~0.2 s)."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return _facts(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _facts(path: str, size: int, mtime_ns: int) -> Facts:
    from gguf.constants import LlamaFileType

    from localgemma.gguf_header import ArrayRef, read_header

    base = Facts(size, mtime_ns / 1e9, mtime_ns)
    try:
        header = read_header(path)
    except LocalGemmaError:
        return base
    info = tuple((k, None if isinstance(v, ArrayRef) else v) for k, v in header.fields.items())
    count = header.get("general.parameter_count")
    if not isinstance(count, int):
        count = sum(math.prod(t.shape) for t in header.tensors.values())
    try:
        quantization = LlamaFileType(header.get("general.file_type")).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quantization = "unknown"
    return dataclasses.replace(base, arch=header.arch, parameters=count, quantization=quantization, info=info)


def human_number(n: int) -> str:
    """Ollama's parameter_size: 268098176 -> "268.10M", 2506172416 -> "2.5B"."""
    for unit, scale, digits in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 0)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{digits}f}{unit}"
    return str(n)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def details(names: Names, target: Target, fact: Optional[Facts]) -> dict[str, Any]:
    parent = f"{names.name_of[target.model_id]}:{LATEST}" if target.finetune else ""
    family = fact.arch if fact else ""
    return {"parent_model": parent, "format": "gguf", "family": family, "families": [family] if family else None,
            "parameter_size": human_number(fact.parameters) if fact and fact.parameters else "",
            "quantization_level": fact.quantization if fact else "unknown"}


def _entry(names: Names, name: str, target: Target) -> dict[str, Any]:
    """One /api/tags model. The digest identifies what is served (the file's size and time, the
    adapter's sha256); hashing gigabytes of weights for a listing would take seconds."""
    from localgemma.models import local_path

    fact = facts(local_path(target.model_id))
    adapter = target.finetune.adapter_path if target.finetune else None
    size = (fact.size if fact else 0) + (adapter.stat().st_size if adapter and adapter.is_file() else 0)
    stamp = json.dumps([target.model_id, fact.size if fact else 0, fact.mtime_ns if fact else 0,
                        target.finetune.sha256 if target.finetune else None])
    modified = target.finetune.modified_at if target.finetune else (_iso(fact.modified) if fact else None)
    return {"name": name, "model": name, "modified_at": modified, "size": size,
            "digest": hashlib.sha256(stamp.encode()).hexdigest(), "details": details(names, target, fact)}


def _tags() -> dict[str, Any]:
    names = _names()
    return {"models": [_entry(names, name, target) for name, target in names.listing()]}


async def tags() -> dict[str, Any]:
    """Every runnable name: served models as NAME:latest, ready finetunes as NAME:FINETUNE."""
    return await anyio.to_thread.run_sync(_tags)


async def show(request: Request) -> dict[str, Any]:
    """One model: its GGUF header's metadata (model_info), details, template and defaults."""
    req: ShowRequest = await _body(request, ShowRequest)
    name = req.model or req.name or ""
    if not name:
        raise IncompleteRequest("model is required: give a name from GET /api/tags", param="model")
    return await anyio.to_thread.run_sync(_show, name, bool(req.verbose), request.app.state.runtime)


def _show(name: str, verbose: bool, runtime: Any) -> dict[str, Any]:
    from localgemma.models import local_path

    names = _names()
    target = names.resolve(name)
    path = local_path(target.model_id)
    fact = facts(path)
    info = fact.model_info if fact else {}
    if verbose and path is not None:
        info = _verbose_info(path, info)
    n_ctx = _served_context(target.model_id, runtime)
    parameters = [("stop", '"<end_of_turn>"'), ("stop", '"<start_of_turn>"'), ("temperature", "0.6"),
                  ("num_predict", "256"), *([("num_ctx", str(n_ctx))] if n_ctx else [])]
    modelfile = [f"# localgemma serves this as {name}", f"FROM {target.model_id}",
                 *([f"ADAPTER {target.finetune.name}"] if target.finetune else []),
                 f'TEMPLATE """{TEMPLATE}"""', *(f"PARAMETER {k} {v}" for k, v in parameters)]
    out = {"license": str(info.get("general.license") or ""), "modelfile": "\n".join(modelfile) + "\n",
           "parameters": "".join(f"{k:<30} {v}\n" for k, v in parameters), "template": TEMPLATE,
           "details": details(names, target, fact), "model_info": info, "capabilities": ["completion", "tools"],
           "modified_at": target.finetune.modified_at if target.finetune else (_iso(fact.modified) if fact else None)}
    if verbose and path is not None:
        out["tensors"] = _tensors(path)
    return out


def _verbose_info(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """verbose: arrays (the tokenizer's) read too, as Ollama shows them."""
    from localgemma.gguf_header import ArrayRef, read_array, read_header

    header = read_header(path)
    return {**info, **{k: read_array(header, k) for k, v in header.fields.items() if isinstance(v, ArrayRef)}}


def _tensors(path: Path) -> list[dict[str, Any]]:
    from gguf.constants import GGMLQuantizationType

    from localgemma.gguf_header import read_header

    def kind(t: int) -> str:
        try:
            return GGMLQuantizationType(t).name
        except ValueError:
            return str(t)

    return [{"name": t.name, "type": kind(t.type), "shape": list(reversed(t.shape))}
            for t in read_header(path).tensors.values()]


def _served_context(model_id: str, runtime: Any = None) -> Optional[int]:
    """The context the model runs with, if it is loaded here; else what it would get."""
    from localgemma.models import CATALOG
    from localgemma.settings import current

    engine = _engines(runtime).get(model_id) if runtime is not None else None
    if engine is not None:
        return engine.n_ctx
    spec = CATALOG.get(model_id)
    return current().n_ctx or (spec.n_ctx if spec else None)


def _engines(runtime: Any) -> dict[str, Any]:
    """Served id -> its loaded engine. (Runtime keeps its engines by file, privately: read-only
    here, for /api/ps; nothing is loaded by asking.)"""
    from localgemma.models import local_path

    loaded = {path: engine for path, engine in dict(getattr(runtime, "_engines", {})).items()}
    out = {}
    for model_id in servable():
        path = local_path(model_id)
        if path is not None and path.resolve() in loaded:
            out[model_id] = loaded[path.resolve()]
    return out


def _ps(runtime: Any) -> dict[str, Any]:
    names = _names()
    models = []
    for model_id, engine in _engines(runtime).items():
        name = f"{names.name_of[model_id]}:{LATEST}"
        entry = _entry(names, name, Target(model_id))
        models.append({**entry, "expires_at": NEVER, "size_vram": 0, "context_length": engine.n_ctx})
    return {"models": models}


async def ps(request: Request) -> dict[str, Any]:
    """The models loaded in this process (they stay loaded: expires_at is far away)."""
    return await anyio.to_thread.run_sync(_ps, request.app.state.runtime)


async def version() -> dict[str, str]:
    return {"version": API_VERSION}


async def running() -> PlainTextResponse:
    return PlainTextResponse("localgemma is running (Ollama API under /api)")


# -- what is not offered ------------------------------------------------------------------------

_PULL = ("models are not downloaded over HTTP here: run `localgemma models pull ID` (or `localgemma models bind "
         "ID FILE.gguf` for a file you have), then restart `localgemma serve` (or serve it with --model ID=PATH)")
NOT_OFFERED: dict[tuple[str, str], str] = {
    ("POST", "/api/pull"): _PULL,
    ("POST", "/api/push"): "there is no model registry to push to; a finetune goes to Cloudflare Workers AI with "
                           "`localgemma finetune push NAME`",
    ("POST", "/api/create"): "models are not created over the Ollama API: a finetune (a PEFT LoRA folder) is "
                             "registered with `localgemma finetune create MODEL NAME FOLDER` (or the Workers AI "
                             "finetune routes under /client/v4/accounts/ID/ai/finetunes) and is then served as "
                             "NAME:FINETUNE",
    ("DELETE", "/api/delete"): "models are not deleted over the Ollama API: a finetune is removed with "
                               "`localgemma finetune delete NAME` (or DELETE /client/v4/accounts/ID/ai/finetunes/"
                               "NAME), a bound model with `localgemma models unbind ID`",
    ("POST", "/api/copy"): "models are not copied here: a model id is bound to a file with `localgemma models "
                           "bind ID FILE.gguf`, a finetune exported with `localgemma finetune export NAME FOLDER`",
    ("HEAD", "/api/blobs/{digest}"): "there is no blob store: model files are bound with `localgemma models bind "
                                     "ID FILE.gguf`, finetunes registered with `localgemma finetune create`",
    ("POST", "/api/blobs/{digest}"): "there is no blob store: model files are bound with `localgemma models bind "
                                     "ID FILE.gguf`, finetunes registered with `localgemma finetune create`",
    ("POST", "/api/embed"): "embeddings are not offered: the served Gemma models are generative only",
    ("POST", "/api/embeddings"): "embeddings are not offered: the served Gemma models are generative only",
}


async def not_offered(request: Request) -> Response:
    route = request.scope.get("route")
    key = (request.method, getattr(route, "path", request.url.path))
    raise NotOffered(f"{request.method} {request.url.path} is not offered by localgemma: {NOT_OFFERED[key]}")

