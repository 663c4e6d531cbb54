"""Plain ASGI middlewares that run before anything reads a body, on every route:

- `Guard` (outermost): every failure becomes an answer in the API's own shape, never a closed
  connection; `/path/` is served as `/path` (no 307 redirect with an empty body).
- `BearerAuth` (`--api-key`): every route but /health wants `Authorization: Bearer KEY`.
- `BodyLimit` (`--max-body-mb`): a body over the limit gets 413 (code 3006); a body that stops
  arriving for `idle` seconds gets 408 (code 3007).

Why not Starlette's/FastAPI's own `max_body_size`: when Content-Length is over the limit it
replaces whatever response the app sends with a plain-text "Content Too Large", so the
error could not be in the Workers AI envelope or OpenAI's shape.
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import Optional, Sequence

import anyio

from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localgemma.errors import BodyTooLarge, InternalError, RequestTimeout, Unauthorized

from .errors import Carried, is_openai, render

OPEN_PATHS = frozenset({"/health"})
log = logging.getLogger("localgemma.server")


class Guard:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/", "raw_path": scope.get("raw_path", b"").rstrip(b"/")}
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:  # noqa: BLE001 - the last line: answer, log, keep the connection
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                error = InternalError(f"internal server error ({type(exc).__name__}); see the server log")
                await render(scope, error)(scope, receive, send)


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = None
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            problem = self._problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
        else:
            await render(scope, Unauthorized(problem))(scope, receive, send)

    def _problem(self, scope: Scope) -> Optional[str]:
        scheme, token = get_authorization_scheme_param(Headers(scope=scope).get("authorization"))
        if scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self._key):
            return None
        if not is_openai(scope):
            return "Authentication error"  # Cloudflare's words, whatever was wrong
        if scheme.lower() != "bearer" or not token:
            return "Missing API key: send the header 'Authorization: Bearer <key>'"
        return "Incorrect API key provided"


class BodyLimit:
    """`limit` bytes per request body; paths matching a pattern in `larger` get that one's."""

    def __init__(self, app: ASGIApp, limit: int, larger: Sequence[tuple[str, int]] = (), idle: float = 30.0):
        self.app = app
        self.limit = limit
        self.idle = idle
        self.larger = [(re.compile(pattern), size) for pattern, size in larger]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = next((size for pattern, size in self.larger if pattern.search(scope["path"])), self.limit)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            # Refused before a byte of it is read.
            await render(scope, too_large(limit))(scope, receive, send)
            return
        await self.app(scope, _counting(receive, limit, self.idle), send)


def too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"Request is too large: the body exceeds the limit of {limit / 2**20:g} MiB "
                        "(localgemma serve --max-body-mb)")


def _counting(receive: Receive, limit: int, idle: float) -> Receive:
    """A chunked body has no Content-Length: count it as it arrives. While the body is
    incomplete each read waits at most `idle` seconds; after it, reads only wait for the
    client to leave (the disconnect watch), for as long as the answer takes."""
    seen, complete = 0, False

    async def limited() -> Message:
        nonlocal seen, complete
        if complete:
            return await receive()
        try:
            with anyio.fail_after(idle):
                message = await receive()
        except TimeoutError:
            raise Carried(RequestTimeout(f"the request body stopped arriving: nothing for {idle:g} s; "
                                         "send the whole body")) from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise Carried(too_large(limit))
            complete = not message.get("more_body", False)
        return message

    return limited


def _content_length(scope: Scope) -> Optional[int]:
    try:
        return int(Headers(scope=scope)["content-length"])
    except (KeyError, ValueError):
        return None
