"""Errors on the wire. Every failure is a `LocalGemmaError` from localgemma.errors (the one
table: Cloudflare code, HTTP status, OpenAI type); this module only renders one in the shape
of the surface the request came in on: Workers AI's envelope, OpenAI's `{"error": {...}}`
under /v1, or Ollama's `{"error": "..."}` under /api -- and maps what only HTTP has (FastAPI's
validation errors, unknown routes) onto that table.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Scope

from localgemma.contract import problems
from localgemma.errors import (IncompleteRequest, InvalidInput, LocalGemmaError, MalformedBody, MethodNotAllowed,
                               NoRoute)

OPENAI_PREFIX = "/v1"
OLLAMA_PREFIX = "/api"


class Carried(HTTPException):
    """A LocalGemmaError raised where FastAPI would turn any other exception into a generic 400
    (while it reads a body); it lets HTTPExceptions through, so the error rides in one."""

    def __init__(self, error: LocalGemmaError):
        super().__init__(error.status, error.message)
        self.error = error


Words = tuple[tuple[str, str], ...]  # (the contract's name for a field, the surface's), most specific first


@contextlib.contextmanager
def worded(words: Words) -> Iterator[None]:
    """Errors from the contract and the runtime name the contract's fields (`max_tokens: ...`);
    raised within this block they name what the surface's request calls them instead."""
    try:
        yield
    except LocalGemmaError as exc:
        reword(exc, words)
        raise


def reword(exc: LocalGemmaError, words: Words) -> LocalGemmaError:
    exc.message = renamed(exc.message, words)
    exc.args = (exc.message,)
    if exc.param is not None:
        exc.param = renamed(exc.param, words)
    return exc


def renamed(message: str, words: Words) -> str:
    for contract, ours in words:
        message = re.sub(rf"(?<![\w.]){re.escape(contract)}\b(?!\.json_schema)", ours, message)
    return message


def is_openai(scope: Scope) -> bool:
    path = scope.get("path", "")
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def is_ollama(scope: Scope) -> bool:
    path = scope.get("path", "")
    return path == OLLAMA_PREFIX or path.startswith(OLLAMA_PREFIX + "/")


def render(scope: Scope, exc: LocalGemmaError) -> JSONResponse:
    """The error in the shape of the surface `scope` belongs to."""
    exc.message = public_text(exc.message)
    # The OpenAI and Cloudflare SDKs retry 408, 409 and 5xx by themselves unless told not to:
    # only a full queue or too many connections (429, 503) can be worth a retry here.
    headers = {"x-should-retry": "true" if exc.status in (429, 503) else "false"}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if is_ollama(scope):  # Ollama answers an unknown model with 404, as OpenAI does
        return JSONResponse({"error": exc.message}, status_code=exc.openai_status or exc.status, headers=headers)
    if not is_openai(scope):
        return JSONResponse(envelope_body(exc), status_code=exc.status, headers=headers)
    return JSONResponse(openai_body(exc), status_code=exc.openai_status or exc.status, headers=headers)


def public_text(message: str) -> str:
    """Where this server keeps its data is nobody's business over HTTP."""
    from localgemma.models import home

    return message.replace(str(home()), "$LOCALGEMMA_HOME")


def envelope_body(exc: LocalGemmaError) -> dict[str, Any]:
    return {"result": {}, "success": False, "errors": [{"code": exc.code, "message": exc.message}], "messages": []}


_FIELD_PREFIX = re.compile(r"^([a-z_]+)(?=[.:\[])")


def openai_body(exc: LocalGemmaError) -> dict[str, Any]:
    # The runtime's messages start with the field at fault ("temperature: ..."): reuse it.
    match = _FIELD_PREFIX.match(exc.message)
    return {"error": {"message": exc.message, "type": exc.openai_type,
                      "param": exc.param or (match.group(1) if match else None), "code": exc.openai_code or str(exc.code)}}


def validation_error(exc: RequestValidationError) -> LocalGemmaError:
    """FastAPI's validation errors, one readable line per problem, naming the field."""
    errors = exc.errors()
    for err in errors:
        if err["type"] == "json_invalid":
            return MalformedBody(f"malformed JSON body: {err.get('ctx', {}).get('error', 'not JSON')} "
                                 f"(at character {err['loc'][-1]}); send one JSON object")
        if not [p for p in err["loc"] if p not in ("body", "form")] and isinstance(err.get("input"), bytes):
            return MalformedBody("the body was not read as JSON: send it with 'Content-Type: application/json'")
    lines = problems(errors, [])
    first = next((str(p) for e in errors for p in e["loc"] if p not in ("body", "form")), None)
    if all(e["type"] == "missing" for e in errors):
        return IncompleteRequest("; ".join(lines), param=first)
    return InvalidInput("; ".join(lines), param=first)


def install(app: FastAPI) -> None:
    """Route every failure through `render`. (Anything unforeseen is answered by
    middleware.Guard, which, unlike an exception handler for Exception -- Starlette re-raises
    after it answers, and the connection is closed -- keeps the connection.)"""

    @app.exception_handler(LocalGemmaError)
    async def _runtime(request: Request, exc: LocalGemmaError):
        return render(request.scope, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return render(request.scope, validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if isinstance(exc, Carried):
            return render(request.scope, exc.error)
        if exc.status_code == 404:
            return render(request.scope, NoRoute(f"No route for that URI: {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return render(request.scope, MethodNotAllowed(f"Method not allowed: {request.method} {request.url.path}"))
        return render(request.scope, LocalGemmaError(str(exc.detail)))
