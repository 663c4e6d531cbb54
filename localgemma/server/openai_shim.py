"""An OpenAI-style surface over the same runtime, for clients that speak OpenAI's API.

    GET  /v1/models                 served models, and each ready finetune as MODEL:ADAPTER
    POST /v1/chat/completions       messages -> chat template -> reply
    POST /v1/completions            prompt -> raw text continuation (no template)

Each endpoint translates its OpenAI request into the Workers AI contract in one function
(`chat_inputs`, `completion_inputs`); a parameter the contract cannot honour is refused with
a 400 naming it, never ignored. Errors take OpenAI's shape (see errors.py).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

import anyio
from fastapi import APIRouter, Request

from localgemma import finetunes
from localgemma.contract import Inputs, parse_inputs
from localgemma.errors import UnknownModel, Unsupported
from localgemma.generation import Chunk, Result
from localgemma.settings import Settings

from .errors import openai_body
from .jsonbody import StrictRoute
from .openai_types import ChatCompletionRequest, ChatMessage, CompletionRequest, _Common
from .queue import Job
from .sse import DONE, begin, dumps, event, event_response
from .workers_ai import check_model


def make_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"], route_class=StrictRoute)
    router.add_api_route("/models", list_models, methods=["GET"])
    router.add_api_route("/models/{model:path}", show_model, methods=["GET"])
    router.add_api_route("/chat/completions", chat_completions, methods=["POST"])
    router.add_api_route("/completions", completions, methods=["POST"])
    return router


# -- translation: OpenAI request -> (model id, contract inputs) -------------------------------

def chat_inputs(req: ChatCompletionRequest) -> tuple[str, dict[str, Any]]:
    _refuse_unhonoured(req)
    if req.logprobs or req.top_logprobs:
        raise _unsupported("logprobs" if req.logprobs else "top_logprobs", "log probabilities are not available")
    if req.max_tokens is not None and req.max_completion_tokens not in (None, req.max_tokens):
        raise _unsupported("max_completion_tokens", f"{req.max_completion_tokens} contradicts max_tokens "
                                                   f"{req.max_tokens}; send one of them")
    model, lora = split_model(req.model)
    called: dict[str, str] = {}  # tool_call_id -> function name, as the conversation goes
    inputs = {"messages": [_message(i, m, called) for i, m in enumerate(req.messages)], **_sampling(req), "lora": lora,
              "max_tokens": req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens}
    if req.response_format and req.response_format.get("type") != "text":
        inputs["response_format"] = req.response_format
    if req.tools:
        inputs["tools"], inputs["tool_choice"] = req.tools, req.tool_choice  # the contract checks both
    elif req.tool_choice not in (None, "none"):
        inputs["tool_choice"] = req.tool_choice  # refused by the contract, naming it
    return model, _drop_none(inputs)


def completion_inputs(req: CompletionRequest) -> tuple[str, dict[str, Any]]:
    _refuse_unhonoured(req)
    if req.echo:
        raise _unsupported("echo", "echoing the prompt is not available")
    if req.suffix:
        raise _unsupported("suffix", "insertion (text after the completion) is not available")
    if req.best_of not in (None, 1):
        raise _unsupported("best_of", f"only 1 can be honoured, got {req.best_of}")
    if req.logprobs is not None:
        raise _unsupported("logprobs", "log probabilities are not available")
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise _unsupported("prompt", f"one prompt per request; got a list of {len(prompt)}")
        prompt = prompt[0]
    model, lora = split_model(req.model)
    # A completion continues the text as written: no chat template (the contract's raw).
    inputs = {"prompt": prompt, "raw": True, **_sampling(req), "lora": lora, "max_tokens": req.max_tokens}
    return model, _drop_none(inputs)


def _unsupported(param: str, message: str) -> Unsupported:
    return Unsupported(f"{param}: {message}", param=param)


def _refuse_unhonoured(req: _Common) -> None:
    if req.n not in (None, 1):
        raise _unsupported("n", f"one choice per request (n=1), got n={req.n}; send separate requests")
    if req.stop:
        raise _unsupported("stop", "stop sequences are not part of the Workers AI contract; generation stops "
                                  "at the end of the model's turn or at max_tokens")
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit bias is not available")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        if value is not None and value < 0:
            raise _unsupported(name, f"negative values cannot be honoured: the contract allows 0..2, got {value}")


def _sampling(req: _Common) -> dict[str, Any]:
    names = ("temperature", "top_p", "top_k", "seed", "frequency_penalty", "presence_penalty", "repetition_penalty")
    return {"stream": req.stream, **{name: getattr(req, name) for name in names}}


def _message(i: int, m: ChatMessage, called: dict[str, str]) -> dict[str, Any]:
    """One OpenAI message as a contract message. An assistant turn that called tools becomes the
    call as the model writes it ({"name", "arguments"} JSON); a tool result gets the name of the
    function it answers (from `called`: tool_call_id -> name, filled as calls are seen)."""
    if m.role == "function":
        raise _unsupported(f"messages[{i}].role", "'function' messages (deprecated) are not supported; use 'tool'")
    role = "system" if m.role == "developer" else m.role
    content = _text(i, m.content)
    if m.tool_calls:
        content = "\n".join(filter(None, [content, *(_call_text(i, j, c, called) for j, c in enumerate(m.tool_calls))]))
    name = m.name or (called.get(m.tool_call_id) if m.role == "tool" else None)
    return _drop_none({"role": role, "content": content, "name": name, "tool_call_id": m.tool_call_id})


def _call_text(i: int, j: int, call: dict[str, Any], called: dict[str, str]) -> str:
    fn = call.get("function") or {}
    try:
        arguments = json.loads(fn.get("arguments") or "{}")
    except (TypeError, json.JSONDecodeError):
        raise _unsupported(f"messages[{i}].tool_calls[{j}].function.arguments",
                          f"must be a JSON object as a string, got {fn.get('arguments')!r}") from None
    if not isinstance(fn.get("name"), str):
        raise _unsupported(f"messages[{i}].tool_calls[{j}].function.name", "a function name (string) is required")
    if call.get("id"):
        called[call["id"]] = fn["name"]
    return json.dumps({"name": fn["name"], "arguments": arguments})


def _text(i: int, content: Union[str, list[dict[str, Any]], None]) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _unsupported(f"messages[{i}].content[{j}]", f"only text parts are accepted (Gemma 2B/7B take "
                                                             f"text only), got type {part.get('type')!r}")
        parts.append(part["text"])
    return "".join(parts)


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def split_model(name: str) -> tuple[str, Optional[str]]:
    """`MODEL` or `MODEL:ADAPTER` -> (model id, finetune name or None). Finetune names cannot
    contain ':', so the last ':' separates."""
    try:
        return check_model(name), None
    except UnknownModel:
        base, sep, adapter = name.rpartition(":")
        if not sep or not base or not adapter:
            raise
        return check_model(base), adapter


# -- responses -------------------------------------------------------------------------------

@dataclass
class _Reply:
    """What every object of one answer repeats, and OpenAI's shapes for the runtime's items."""

    kind: str  # "chat" or "text"
    model: str
    include_usage: bool
    # With tools, the text may turn out to be a tool call: held back until the end, then sent
    # as content or as tool_calls, never both.
    hold_text: bool = False
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, result: Result) -> dict[str, Any]:
        usage = result.usage.to_dict()
        if self.kind == "text":
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
            return {**self.head("text_completion"), "choices": [choice], "usage": usage}
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.tool_calls:
            message = {"role": "assistant", "content": None, "tool_calls": _tool_calls(result.tool_calls)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}
        return {**self.head("chat.completion"), "choices": [choice], "usage": usage}

    def piece(self, text: Optional[str], finish: Optional[str] = None, role: bool = False) -> dict[str, Any]:
        if self.kind == "text":
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {**self.head("text_completion"), "choices": [choice]}
        else:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text is not None else {})
            out = {**self.head("chat.completion.chunk"),
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the extra last one
        return out

    def calls(self, calls: tuple[dict, ...]) -> dict[str, Any]:
        deltas = [{"index": i, **call} for i, call in enumerate(_tool_calls(calls))]
        return self.piece(None) | {"choices": [{"index": 0, "delta": {"tool_calls": deltas}, "logprobs": None,
                                                "finish_reason": None}]}

    def usage(self, result: Result) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "text" else "chat.completion.chunk"
        return {**self.head(obj), "choices": [], "usage": result.usage.to_dict()}


def _tool_calls(calls: tuple[dict, ...]) -> list[dict[str, Any]]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": dumps(c.get("arguments", {}))}} for c in calls]


async def _events(reply: _Reply, first: Chunk | Result, job: Job) -> AsyncIterator[dict[str, str]]:
    if reply.kind == "chat":
        yield event(reply.piece("", role=True))
    held, item = [], first
    while isinstance(item, Chunk):  # the runtime's last item is the Result
        if reply.hold_text:
            held.append(item.text)
        else:
            yield event(reply.piece(item.text))
        item = await job.get()
    if item.tool_calls:
        yield event(reply.calls(item.tool_calls))
    elif held:
        yield event(reply.piece("".join(held)))
    yield event(reply.piece(None if reply.kind == "chat" else "", item.finish_reason))
    if reply.include_usage:
        yield event(reply.usage(item))
    yield DONE


async def _answer(request: Request, reply: _Reply, model: str, inputs: Inputs):
    job, first = await begin(request, request.app.state.scheduler, model, inputs)
    if not inputs.stream:
        return reply.whole(first)
    return event_response(_events(reply, first, job), job, openai_body)


# -- routes ----------------------------------------------------------------------------------

async def chat_completions(request: Request, body: ChatCompletionRequest):
    model, fields = chat_inputs(body)
    inputs = parse_inputs(fields)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    hold = bool(getattr(inputs, "tools", None)) and getattr(inputs, "tool_choice", None) != "none"
    return await _answer(request, _Reply("chat", body.model, include_usage, hold), model, inputs)


async def completions(request: Request, body: CompletionRequest):
    model, fields = completion_inputs(body)
    inputs = parse_inputs(fields)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(request, _Reply("text", body.model, include_usage), model, inputs)


async def list_models(request: Request):
    return {"object": "list", "data": await _model_cards(request.app.state.settings)}


async def show_model(request: Request, model: str):
    for card in await _model_cards(request.app.state.settings):
        if card["id"] == model:
            return card
    raise UnknownModel(f"model {model!r} is not served here; GET /v1/models lists what is")


async def _model_cards(settings: Settings) -> list[dict[str, Any]]:
    served = settings.served_models
    entries = await anyio.to_thread.run_sync(finetunes.list_finetunes)
    cards = [{"id": m, "object": "model", "created": 0, "owned_by": "localgemma"} for m in served]
    for e in entries:
        if e.status == "ready" and e.model in served:
            cards.append({"id": f"{e.model}:{e.name}", "object": "model", "created": _epoch(e.created_at),
                          "owned_by": "localgemma", "parent": e.model})
    return cards


def _epoch(iso: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
