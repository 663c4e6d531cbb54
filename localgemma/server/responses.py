"""OpenAI's Responses API over the same runtime (what LangChain's `use_responses_api`,
pydantic-ai's OpenAIResponsesModel and the OpenAI Agents SDK speak).

    POST /v1/responses     input (a string, or message / function_call / function_call_output
                           items), instructions, max_output_tokens, temperature, top_p, tools
                           (flat function tools), tool_choice, text.format, stream

The request is translated into the Workers AI contract in one function (`responses_inputs`);
the answer is a Response object, or the typed event stream (`event:` + `data:` lines, a
sequence_number on every event, no [DONE]). Nothing is stored: `store: true` and
`previous_response_id` are refused with a 400 saying so; the conversation travels in `input`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import Request
from pydantic import Field

from localgemma.contract import parse_inputs
from localgemma.errors import LocalGemmaError, Unsupported
from localgemma.generation import Chunk, Result, TokenLogprob

from .errors import reword, worded
from .openai_shim import split_model
from .openai_types import _Wire
from .queue import Job
from .sse import begin, dumps, event, event_response

LOGPROBS = "message.output_text.logprobs"


# OpenAI's values for `include`; only the logprobs one adds anything here (the others name
# outputs of tools this server does not run, or stored reasoning it never makes).
INCLUDABLE = Literal["message.output_text.logprobs", "reasoning.encrypted_content", "file_search_call.results",
                     "web_search_call.results", "web_search_call.action.sources", "message.input_image.image_url",
                     "computer_call_output.output.image_url", "code_interpreter_call.outputs"]
# The contract's names for fields, as this API calls them (in errors).
WORDS = (("response_format.json_schema", "text.format.schema"), ("response_format", "text.format"),
         ("max_tokens", "max_output_tokens"))


class TextFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None


class TextConfig(_Wire):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None


class ResponsesRequest(_Wire):
    model: str
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None  # at most one call is ever made: both are honoured
    max_tool_calls: Optional[int] = None
    text: Optional[TextConfig] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    include: Optional[list[INCLUDABLE]] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    store: Optional[bool] = None
    previous_response_id: Optional[str] = None
    conversation: Union[str, dict[str, Any], None] = None
    background: Optional[bool] = None
    reasoning: Optional[dict[str, Any]] = None
    truncation: Optional[Literal["auto", "disabled"]] = None
    metadata: Optional[dict[str, str]] = None
    # labels with nothing to do locally
    user: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    service_tier: Optional[str] = None


# -- translation: Responses request -> (model id, contract inputs) ------------------------------

def responses_inputs(req: ResponsesRequest) -> tuple[str, dict[str, Any]]:
    _refuse_unhonoured(req)
    model, lora = split_model(req.model)
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        messages += _message(i, item)
    inputs: dict[str, Any] = {"messages": messages, "stream": bool(req.stream), "lora": lora,
                              "max_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p}
    if req.tools:
        inputs["tools"] = [_tool(i, tool) for i, tool in enumerate(req.tools)]
        inputs["tool_choice"] = _tool_choice(req.tool_choice)
    elif req.tool_choice not in (None, "none", "auto"):
        inputs["tool_choice"] = _tool_choice(req.tool_choice)  # refused by the contract, naming it
    text_format = req.text.format if req.text and req.text.format else TextFormat(type="text")
    if text_format.type == "json_object":
        inputs["response_format"] = {"type": "json_object"}
    elif text_format.type == "json_schema":
        if text_format.schema_ is None:
            raise _unsupported("text.format.schema", "a JSON schema object is required with type json_schema")
        inputs["response_format"] = {"type": "json_schema", "json_schema": {"schema": text_format.schema_}}
    return model, {k: v for k, v in inputs.items() if v is not None}


def logprobs_option(req: ResponsesRequest) -> Optional[int]:
    return (req.top_logprobs or 0) if LOGPROBS in (req.include or []) else None


def _unsupported(param: str, message: str) -> Unsupported:
    return Unsupported(f"{param}: {message}", param=param)


def _refuse_unhonoured(req: ResponsesRequest) -> None:
    if req.store:
        raise _unsupported("store", "responses are not kept on this server; send store: false (or leave it out) "
                                    "and pass the conversation in input")
    if req.previous_response_id:
        raise _unsupported("previous_response_id", "responses are not kept on this server, so there is none to "
                                                   "continue; pass the conversation in input")
    if req.conversation:
        raise _unsupported("conversation", "conversations are not kept on this server; pass the turns in input")
    if req.background:
        raise _unsupported("background", "background responses need storage, which this server does not keep")
    if req.reasoning and any(v is not None for v in req.reasoning.values()):
        raise _unsupported("reasoning", "Gemma does not reason before answering; leave reasoning out")
    if req.text and req.text.verbosity not in (None, "medium"):
        raise _unsupported("text.verbosity", f"{req.text.verbosity!r} cannot be honoured: the model's replies "
                                             "have no verbosity setting; leave it out (or send 'medium')")
    if req.truncation == "auto":
        raise _unsupported("truncation", "'auto' would drop turns silently; a conversation too long for the "
                                         "context is refused instead (use 'disabled')")


def _message(i: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    """One input item as contract messages: a message, a call the assistant made, or its result.
    Reasoning items and references (from other servers' outputs) carry nothing for Gemma."""
    kind = item.get("type", "message")
    where = f"input[{i}]"
    if kind == "message":
        role = {"developer": "system"}.get(item.get("role"), item.get("role"))
        return [{"role": role, "content": _text(where, item.get("content"))}]
    if kind == "function_call":
        return [{"role": "assistant", "content": None, "tool_calls": [{
            "id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}]}]
    if kind == "function_call_output":
        return [{"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(where, item.get("output"))}]
    if kind in ("reasoning", "item_reference"):
        return []
    raise _unsupported(f"{where}.type", f"{kind!r} items are not accepted; send message, function_call or "
                                        "function_call_output items")


def _text(where: str, content: Any) -> Any:
    if not isinstance(content, list):
        return content  # a string (or something the contract will refuse, naming it)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _unsupported(f"{where}.content[{j}]", f"only text parts are accepted (Gemma 2B/7B take text "
                                                       f"only), got {kind!r}")
        texts.append(part.get("text", ""))
    return "".join(texts)


def _tool(i: int, tool: dict[str, Any]) -> dict[str, Any]:
    """A flat Responses function tool as the contract's {type, function: {...}}."""
    if tool.get("type") != "function":
        raise _unsupported(f"tools[{i}].type", f"{tool.get('type')!r}; only function tools can be offered here")
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    if isinstance(choice, dict):
        raise _unsupported("tool_choice", f"{choice!r}; use none, auto, required or {{type: function, name}}")
    return choice


# -- the Response object ------------------------------------------------------------------------

class _Reply:
    """The ids and echoes every object of one response repeats, and its items."""

    def __init__(self, req: ResponsesRequest, logprobs: bool):
        self.req, self.logprobs = req, logprobs
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.seq = -1

    def response(self, status: str, output: list, result: Optional[Result] = None) -> dict[str, Any]:
        req = self.req
        incomplete = result is not None and result.finish_reason == "length"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": req.model,
            "status": "incomplete" if incomplete else status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": req.temperature, "top_p": req.top_p, "top_logprobs": req.top_logprobs,
            "text": self.text(), "tool_choice": req.tool_choice or "auto",
            "tools": [{"strict": True, "description": None, **t} for t in req.tools or []],
            "truncation": req.truncation or "disabled", "metadata": req.metadata or {}, "user": req.user,
            "usage": self.usage(result) if result is not None else None,
        }

    def text(self) -> dict[str, Any]:
        """The text configuration as asked (OpenAI echoes it), the defaults filled in."""
        asked = self.req.text.model_dump(by_alias=True, exclude_none=True) if self.req.text else {}
        return {"format": {"type": "text"}, "verbosity": "medium", **asked}

    @staticmethod
    def usage(result: Result) -> dict[str, Any]:
        u = result.usage
        return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens}

    def message(self, text: str, status: str, logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        content = [self.text_part(text, logprobs)] if status != "in_progress" else []
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def text_part(self, text: str, logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if self.logprobs:
            part["logprobs"] = _logprobs(logprobs, with_bytes=True)
        return part

    @staticmethod
    def call(call: dict, status: str = "completed") -> dict[str, Any]:
        return {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": status,
                "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": call["name"],
                "arguments": dumps(call.get("arguments", {}))}

    def output(self, result: Result) -> list[dict[str, Any]]:
        if result.tool_calls:
            return [self.call(c) for c in result.tool_calls]
        status = "incomplete" if result.finish_reason == "length" else "completed"
        return [self.message(result.text, status, result.logprobs)]

    def whole(self, result: Result) -> dict[str, Any]:
        return self.response("completed", self.output(result), result)

    def event(self, kind: str, **fields: Any) -> dict[str, str]:
        self.seq += 1
        return event({"type": kind, **fields, "sequence_number": self.seq}, kind)

    def error_event(self, error: LocalGemmaError) -> dict[str, str]:
        reword(error, WORDS)
        return self.event("error", code=error.openai_code or str(error.code), message=error.message, param=error.param)


def _logprobs(entries: tuple[TokenLogprob, ...], with_bytes: bool) -> list[dict[str, Any]]:
    def one(token: str, raw: bytes, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, **({"bytes": list(raw)} if with_bytes else {})}

    return [{**one(e.token, e.bytes, e.logprob), "top_logprobs": [one(*alt) for alt in e.top]} for e in entries]


async def _events(reply: _Reply, first: Union[Chunk, Result], job: Job) -> AsyncIterator[dict[str, str]]:
    """The typed sequence: created, in_progress, then each output item (added, its parts and
    deltas, done), then completed (or incomplete)."""
    started = reply.response("in_progress", [])
    yield reply.event("response.created", response=started)
    yield reply.event("response.in_progress", response=started)
    item, text, opened = first, [], False
    while isinstance(item, Chunk):  # text as it comes (a call never streams as text)
        if not opened:
            opened = True
            yield reply.event("response.output_item.added", output_index=0, item=reply.message("", "in_progress"))
            yield reply.event("response.content_part.added", item_id=reply.message_id, output_index=0,
                              content_index=0, part=reply.text_part(""))
        text.append(item.text)
        yield reply.event("response.output_text.delta", item_id=reply.message_id, output_index=0, content_index=0,
                          delta=item.text, logprobs=_logprobs(item.logprobs, with_bytes=False))
        item = await job.get()
    result: Result = item
    output = reply.output(result)
    for index, done in enumerate(output):
        if done["type"] == "function_call":
            added = {**done, "status": "in_progress", "arguments": ""}
            yield reply.event("response.output_item.added", output_index=index, item=added)
            yield reply.event("response.function_call_arguments.delta", item_id=done["id"], output_index=index,
                              delta=done["arguments"])
            yield reply.event("response.function_call_arguments.done", item_id=done["id"], output_index=index,
                              name=done["name"], arguments=done["arguments"])
        else:
            if not opened:
                yield reply.event("response.output_item.added", output_index=0, item=reply.message("", "in_progress"))
                yield reply.event("response.content_part.added", item_id=reply.message_id, output_index=0,
                                  content_index=0, part=reply.text_part(""))
            part = done["content"][0]
            yield reply.event("response.output_text.done", item_id=reply.message_id, output_index=0,
                              content_index=0, text=part["text"], logprobs=_logprobs(result.logprobs, with_bytes=False))
            yield reply.event("response.content_part.done", item_id=reply.message_id, output_index=0,
                              content_index=0, part=part)
        yield reply.event("response.output_item.done", output_index=index, item=done)
    final = reply.response("completed", output, result)
    yield reply.event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                      response=final)


async def create_response(request: Request, body: ResponsesRequest):
    model, fields = responses_inputs(body)
    logprobs = logprobs_option(body)
    reply = _Reply(body, logprobs is not None)
    with worded(WORDS):
        inputs = parse_inputs(fields)
        job, first = await begin(request, request.app.state.scheduler, model, inputs, logprobs=logprobs)
    if not inputs.stream:
        return reply.whole(first)
    return event_response(_events(reply, first, job), job, reply.error_event)


def make_router():
    from fastapi import APIRouter

    from .jsonbody import StrictRoute

    router = APIRouter(prefix="/v1", tags=["OpenAI"], route_class=StrictRoute)
    router.add_api_route("/responses", create_response, methods=["POST"])
    return router
