"""Plain ASGI middlewares that run before anything reads a body, on every route:

- `Guard` (outermost): every failure becomes an answer in the API's own shape, never a closed
  connection; `/path/` is served as `/path` (no 307 redirect with an empty body).
- `BrowserGuard`: what web pages may do. A Host this server does not answer to is refused (DNS
  rebinding); a request that does work or changes state (anything but GET, HEAD, OPTIONS) from a
  page on another origin is refused before anything runs, whatever its Content-Type (a
  `no-cors` text/plain POST included), unless that origin is allowed (--cors-origin); then
  Starlette's CORSMiddleware answers preflights and adds the headers.
- `BearerAuth` (`--api-key`): every route but /health, the playground page and the API docs wants
  `Authorization: Bearer KEY`.
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

from localgemma.errors import BodyTooLarge, Forbidden, InternalError, RequestTimeout, Unauthorized

from .errors import Carried, is_openai, render

# Open even with --api-key: health, and what a browser loads before it can send a key (the page,
# which asks for it, and the API docs: the contract is no secret).
OPEN_PATHS = frozenset({"/health", "/", "/docs", "/redoc", "/openapi.json", "/schema/inputs"})
OPEN_PREFIXES = ("/playground/", "/docs-assets/")
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


class BrowserGuard:
    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
    LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})

    def __init__(self, app: ASGIApp, bound: str, allowed_hosts: Sequence[str] = (), cors_origins: Sequence[str] = ()):
        self.app = app
        self.hosts = self.LOOPBACK | {h.strip("[]").lower() for h in (bound, *allowed_hosts)}
        self.any_ip = bound in ("0.0.0.0", "::", "")  # listening everywhere: any address may name it
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        problem = self._host_problem(headers.get("host", "")) or self._origin_problem(scope, headers)
        if problem:
            await render(scope, Forbidden(problem))(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _host_problem(self, host: str) -> Optional[str]:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if name in self.hosts or (self.any_ip and _is_ip(name)):
            return None
        return (f"this server does not answer to the host name {name!r} (a page may be trying DNS rebinding); "
                "allow it with localgemma serve --allowed-host NAME")

    def _origin_problem(self, scope: Scope, headers: Headers) -> Optional[str]:
        origin = headers.get("origin")
        cross = headers.get("sec-fetch-site") == "cross-site"
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if (scope["method"] in self.SAFE and not preflight) or (origin is None and not cross):
            return None  # reads are safe (CORS keeps their answers from other pages); no Origin: not a browser
        if origin is not None and self.allowed(origin, f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"):
            return None
        return (f"requests from web pages at {origin or 'another site'} are not allowed here; allow that origin "
                "with localgemma serve --cors-origin ORIGIN")

    def allowed(self, origin: str, own: str) -> bool:
        """`own`: this server's origin as the request reached it (scheme://host[:port]; the scheme
        is https behind a local TLS proxy that says so, uvicorn's --proxy-headers)."""
        origin = origin.rstrip("/").lower()
        return origin == own.lower() or "*" in self.origins or origin in self.origins


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = None
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
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
