"""Errors on the wire. Every failure is a `LocalGemmaError` (Cloudflare `code`, HTTP `status`,
`message`); this module renders one in the shape of the surface the request came in on:
Workers AI's envelope, or OpenAI's `{"error": {...}}` under /v1.

The runtime's errors already carry their codes, so there is no translation table here, only
the few errors that exist because there is HTTP (body, auth, queue, routes).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Scope

from localgemma.errors import ContextOverflow, LocalGemmaError, UnknownModel

log = logging.getLogger("localgemma.server")

OPENAI_PREFIX = "/v1"


class ApiError(LocalGemmaError):
    """An error with its code and status given per instance; `param` names the request
    field at fault (OpenAI's `param`)."""

    def __init__(self, message: str, *, code: int = 5004, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.code, self.status, self.param = code, status, param


class QueueFull(LocalGemmaError):
    code = 3040  # "out of capacity"
    status = 429


class Unauthorized(LocalGemmaError):
    code = 10000  # what api.cloudflare.com answers for a missing or wrong token
    status = 401

    def __init__(self, message: str = "Authentication error"):
        super().__init__(message)


class Unsupported(ApiError):
    """An OpenAI parameter the contract has no way to honour."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}", code=5004, status=400, param=param)


# Cloudflare codes for errors that only HTTP has.
_HTTP_CODES = {
    400: 5004,  # invalid data
    401: 10000,  # authentication error
    404: 7000,  # "No route for that URI"
    405: 7001,  # "Method not allowed"
    408: 3007,  # timeout
    413: 3006,  # request too large
    429: 3040,  # out of capacity
}
INTERNAL_CODE = 3043  # internal server error


def is_openai(scope: Scope) -> bool:
    path = scope.get("path", "")
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def render(scope: Scope, exc: LocalGemmaError) -> JSONResponse:
    """The error in the shape of the surface `scope` belongs to."""
    exc.message = public_text(exc.message)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if not is_openai(scope):
        return JSONResponse(envelope_body(exc), status_code=exc.status, headers=headers)
    status = 404 if isinstance(exc, UnknownModel) else exc.status  # OpenAI's model_not_found is a 404
    return JSONResponse(openai_body(exc), status_code=status, headers=headers)


def public_text(message: str) -> str:
    """Where this server keeps its data is nobody's business over HTTP."""
    from localgemma.models import home

    return message.replace(str(home()), "$LOCALGEMMA_HOME")


def envelope_body(exc: LocalGemmaError) -> dict[str, Any]:
    return {"result": {}, "success": False, "errors": [{"code": exc.code, "message": exc.message}], "messages": []}


def openai_body(exc: LocalGemmaError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": _openai_type(exc.status),
                      "param": getattr(exc, "param", None) or _param_of(exc.message), "code": _openai_code(exc)}}


def _openai_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _openai_code(exc: LocalGemmaError) -> str:
    if isinstance(exc, UnknownModel):
        return "model_not_found"
    if isinstance(exc, ContextOverflow):
        return "context_length_exceeded"
    if isinstance(exc, Unauthorized):
        return "invalid_api_key"
    if isinstance(exc, QueueFull):
        return "rate_limit_exceeded"
    return str(exc.code)  # Cloudflare's code, for lack of an OpenAI one


_FIELD_PREFIX = re.compile(r"^([a-z_]+)(?=[.:\[])")


def _param_of(message: str) -> Optional[str]:
    # The runtime's messages start with the field at fault ("temperature: ..."): reuse it.
    match = _FIELD_PREFIX.match(message)
    return match.group(1) if match else None


def http_error(status: int, detail: str) -> ApiError:
    return ApiError(detail, code=_HTTP_CODES.get(status, INTERNAL_CODE if status >= 500 else 5004), status=status)


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's validation errors, one readable line per problem, naming the field."""
    problems, first = [], None
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p not in ("body", "form")]
        if err["type"] == "json_invalid":
            ctx = err.get("ctx", {})
            return ApiError(f"malformed JSON body: {ctx.get('error', 'not JSON')} (at character {err['loc'][-1]}); "
                            "send one JSON object")
        where = ".".join(loc) or "body"
        first = first or (loc[0] if loc else None)
        if not loc and isinstance(err.get("input"), bytes):
            return ApiError("the body was not read as JSON: send it with 'Content-Type: application/json'")
        if not loc:
            problems.append(f"body: must be a JSON object (got {_show(err.get('input'))})")
            continue
        if err["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown or unsupported parameter")
        elif err["type"] == "missing":
            problems.append(f"{where}: required")
        else:
            problems.append(f"{where}: {err['msg']} (got {_show(err.get('input'))})")
    code = 3003 if all(e["type"] == "missing" for e in exc.errors()) else 3010
    return ApiError("; ".join(problems), code=code, status=400, param=first)


def _show(value: Any) -> str:
    text = json.dumps(value, default=repr) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def install(app: FastAPI) -> None:
    """Route every failure through `render`."""

    @app.exception_handler(LocalGemmaError)
    async def _runtime(request: Request, exc: LocalGemmaError):
        return render(request.scope, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return render(request.scope, validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return render(request.scope, http_error(exc.status_code, _http_detail(request, exc)))

    # Anything else is answered by middleware.Guard, which (unlike an exception handler
    # for Exception, which Starlette re-raises after answering) keeps the connection open.


def _http_detail(request: Request, exc: HTTPException) -> str:
    if exc.status_code == 404:
        return f"No route for that URI: {request.method} {request.url.path}"
    if exc.status_code == 405:
        return f"Method not allowed: {request.method} {request.url.path}"
    return str(exc.detail)
