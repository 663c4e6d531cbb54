"""An OpenAI-style surface over the same runtime, for clients that speak OpenAI's API.

    GET  /v1/models                 served models, and each ready finetune as MODEL:ADAPTER
    POST /v1/chat/completions       messages -> chat template -> reply
    POST /v1/completions            prompt -> raw text continuation (no template)

Each endpoint translates its OpenAI request into the Workers AI contract in one function
(`chat_inputs`, `completion_inputs`); a parameter the contract cannot honour is refused with
a 400 naming it, never ignored. Errors take OpenAI's shape (see errors.py).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

import anyio
from fastapi import APIRouter, Request

from localgemma import finetunes
from localgemma.contract import Inputs, parse_inputs
from localgemma.errors import InvalidInput, UnknownModel, Unsupported
from localgemma.generation import Chunk, Result, TokenLogprob

from .errors import openai_body
from .jsonbody import StrictRoute
from .openai_types import ChatCompletionRequest, ChatMessage, CompletionRequest, _Common
from .queue import Job
from .sse import DONE, begin, dumps, event, event_response
from .served import check_model, servable


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
    if req.max_tokens is not None and req.max_completion_tokens not in (None, req.max_tokens):
        raise _unsupported("max_completion_tokens", f"{req.max_completion_tokens} contradicts max_tokens "
                                                   f"{req.max_tokens}; send one of them")
    model, lora = split_model(req.model)
    inputs = {"messages": [_message(i, m) for i, m in enumerate(req.messages)], **_sampling(req), "lora": lora,
              "max_tokens": req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens}
    if req.response_format:
        kind = req.response_format.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise InvalidInput(f"response_format.type: {dumps(kind)[:60]} is not accepted; send 'text', "
                               "'json_object' or 'json_schema'", param="response_format.type")
        if kind != "text":
            inputs["response_format"] = req.response_format
    if req.tools:
        inputs["tools"], inputs["tool_choice"] = req.tools, req.tool_choice  # the contract checks both
    elif req.tool_choice not in (None, "none"):
        inputs["tool_choice"] = req.tool_choice  # refused by the contract, naming it
    return model, _drop_none(inputs)


def chat_logprobs(req: ChatCompletionRequest) -> Optional[int]:
    """OpenAI's logprobs (true/false) and top_logprobs (0-20) as the runtime's option."""
    if req.top_logprobs is not None and not req.logprobs:
        raise _unsupported("top_logprobs", "needs logprobs: true")
    return (req.top_logprobs or 0) if req.logprobs else None


def completion_inputs(req: CompletionRequest) -> tuple[str, dict[str, Any]]:
    _refuse_unhonoured(req)
    if req.echo:
        raise _unsupported("echo", "echoing the prompt is not available")
    if req.suffix:
        raise _unsupported("suffix", "insertion (text after the completion) is not available")
    if req.best_of not in (None, 1):
        raise _unsupported("best_of", f"only 1 can be honoured, got {req.best_of}")
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
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit bias is not available")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        if value is not None and value < 0:
            raise _unsupported(name, f"negative values cannot be honoured: the contract allows 0..2, got {value}")


def _sampling(req: _Common) -> dict[str, Any]:
    names = ("temperature", "top_p", "top_k", "seed", "frequency_penalty", "presence_penalty", "repetition_penalty",
             "stop")
    return {"stream": req.stream, **{name: getattr(req, name) for name in names}}


def _message(i: int, m: ChatMessage) -> dict[str, Any]:
    """One OpenAI message as a contract message (the contract takes assistant tool_calls and
    tool results as they are; developer is system)."""
    if m.role == "function":
        raise _unsupported(f"messages[{i}].role", "'function' messages (deprecated) are not supported; use 'tool'")
    role = "system" if m.role == "developer" else m.role
    content = _text(i, m.content)
    return _drop_none({"role": role, "content": "" if content is None and not m.tool_calls else content,
                       "name": m.name, "tool_call_id": m.tool_call_id, "tool_calls": m.tool_calls})


def _text(i: int, content: Union[str, list[dict[str, Any]], None]) -> Optional[str]:
    if content is None or isinstance(content, str):
        return content
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
    logprobs: bool = False
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, result: Result) -> dict[str, Any]:
        usage = result.usage.to_dict()
        logprobs = self._logprobs(result.logprobs)
        if self.kind == "text":
            choice = {"index": 0, "text": result.text, "logprobs": logprobs, "finish_reason": result.finish_reason}
            return {**self.head("text_completion"), "choices": [choice], "usage": usage}
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.tool_calls:
            message = {"role": "assistant", "content": None, "tool_calls": _tool_calls(result.tool_calls)}
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": result.finish_reason}
        return {**self.head("chat.completion"), "choices": [choice], "usage": usage}

    def piece(self, text: Optional[str], finish: Optional[str] = None, role: bool = False,
              logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        entries = self._logprobs(logprobs) if logprobs else None
        if self.kind == "text":
            choice = {"index": 0, "text": text or "", "logprobs": entries, "finish_reason": finish}
            out = {**self.head("text_completion"), "choices": [choice]}
        else:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text is not None else {})
            out = {**self.head("chat.completion.chunk"),
                   "choices": [{"index": 0, "delta": delta, "logprobs": entries, "finish_reason": finish}]}
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

    def _logprobs(self, entries: tuple[TokenLogprob, ...]) -> Optional[dict[str, Any]]:
        """OpenAI's shapes: chat {content: [{token, logprob, bytes, top_logprobs}]}; completions
        the parallel lists {tokens, token_logprobs, top_logprobs, text_offset}."""
        if not self.logprobs:
            return None
        if self.kind == "chat":
            return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in e.top]}
                                for e in entries], "refusal": None}
        offsets, at = [], 0
        for e in entries:
            offsets.append(at)
            at += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{t: lp for t, _, lp in e.top} for e in entries], "text_offset": offsets}


def _tool_calls(calls: tuple[dict, ...]) -> list[dict[str, Any]]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": dumps(c.get("arguments", {}))}} for c in calls]


async def _events(reply: _Reply, first: Chunk | Result, job: Job) -> AsyncIterator[dict[str, str]]:
    if reply.kind == "chat":
        yield event(reply.piece("", role=True))
    item = first
    while isinstance(item, Chunk):  # the runtime's last item is the Result; a call never streams as text
        yield event(reply.piece(item.text, logprobs=item.logprobs))
        item = await job.get()
    if item.tool_calls:
        yield event(reply.calls(item.tool_calls))
    yield event(reply.piece(None if reply.kind == "chat" else "", item.finish_reason))
    if reply.include_usage:
        yield event(reply.usage(item))
    yield DONE


async def _answer(request: Request, reply: _Reply, model: str, inputs: Inputs, logprobs: Optional[int]):
    job, first = await begin(request, request.app.state.scheduler, model, inputs, logprobs=logprobs)
    if not inputs.stream:
        return reply.whole(first)
    return event_response(_events(reply, first, job), job, lambda error: event(openai_body(error)))


# -- routes ----------------------------------------------------------------------------------

async def chat_completions(request: Request, body: ChatCompletionRequest):
    model, fields = chat_inputs(body)
    inputs = parse_inputs(fields)
    logprobs = chat_logprobs(body)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(request, _Reply("chat", body.model, include_usage, logprobs is not None), model, inputs,
                         logprobs)


async def completions(request: Request, body: CompletionRequest):
    model, fields = completion_inputs(body)
    inputs = parse_inputs(fields)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(request, _Reply("text", body.model, include_usage, body.logprobs is not None), model, inputs,
                         body.logprobs)


async def list_models(request: Request):
    return {"object": "list", "data": await _model_cards()}


async def show_model(request: Request, model: str):
    for card in await _model_cards():
        if card["id"] == model:
            return card
    raise UnknownModel(f"model {model!r} is not served here; GET /v1/models lists what is")


async def _model_cards() -> list[dict[str, Any]]:
    served = await anyio.to_thread.run_sync(servable)
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
