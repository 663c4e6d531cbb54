"""What both surfaces share between the scheduler and the wire: waiting for a job's first item
while watching for the client to leave, and server-sent events (`EventStream`).

A stream is committed to `text/event-stream` only once its first chunk exists: whatever
fails before the first token (validation, an unknown lora, a prompt too long for the context)
is still an ordinary JSON error with its own status.

`EventStream` frames and sends the events itself, as a plain ASGI response, because every
streamed token passes through it: per event it formats one bytes object and awaits one
`send`, nothing else. What must be watched for -- the client leaving, a client that stops
reading (SEND_TIMEOUT), a stream gone quiet (a keep-alive comment every PING_SECONDS) -- is
watched by two tasks per stream that wake on their own clock, not per event. (sse-starlette,
used before, opened a cancel scope around every send: a fifth of the event loop's time per
token, measured.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar

import anyio
from fastapi import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from localgemma.errors import Aborted, InternalError, LocalGemmaError

from .queue import END, Job, Scheduler

T = TypeVar("T")
log = logging.getLogger("localgemma.server")

DONE = {"data": "[DONE]"}
PING_SECONDS = 15  # keep-alive comments only in streams that go quiet this long
SEND_TIMEOUT = 30  # a client that stops reading this long is dropped (and its job cancelled)


def client_gone() -> Aborted:
    return Aborted("the client closed the connection before the answer was ready")


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 text kept as is (like JSON.stringify)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def event(obj: Any, name: Optional[str] = None) -> dict[str, str]:
    """One server-sent event: `data: JSON` (after `event: NAME` when named)."""
    return {"data": dumps(obj)} if name is None else {"event": name, "data": dumps(obj)}


def frame(item: dict[str, str]) -> bytes:
    """One event on the wire: `event: NAME` (when named), a `data:` line per line of data,
    and the blank line that ends it."""
    data = item["data"]
    if "\n" in data or "\r" in data:  # the only line ends in SSE (not U+2028, which JSON may hold)
        lines = "".join(f"data: {line}\n" for line in re.split(r"\r\n|\r|\n", data))
    else:
        lines = f"data: {data}\n"
    name = item.get("event")
    return (f"event: {name}\n{lines}\n" if name else f"{lines}\n").encode()


class EventStream(Response):
    """A `text/event-stream` response (an ASGI app): `events` framed one by one, then the end
    of the body. The stream stops -- and `events` is closed, which cancels its job -- when the
    events end, the client disconnects, or one send waits longer than `send_timeout` (a client
    that stopped reading). A stream with nothing to send for `ping` seconds sends a comment, so
    proxies keep the connection open while a long prompt is read."""

    raw = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
           (b"connection", b"keep-alive"), (b"x-accel-buffering", b"no")]

    def __init__(self, events: AsyncIterator[dict[str, str]], ping: float = PING_SECONDS,
                 send_timeout: float = SEND_TIMEOUT, tick: float = 1.0,
                 on_first: Optional[Callable[[], None]] = None):
        """`on_first`: called once the first event is written (Job.sent_first)."""
        self.events, self.ping, self.send_timeout, self.tick = events, ping, send_timeout, tick
        self.on_first = on_first
        self.status_code, self.background, self.raw_headers = 200, None, list(self.raw)
        self.sending_since: Optional[float] = None  # loop time a send started; None between sends
        self.last_sent = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope.get("method") == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        loop = asyncio.get_running_loop()
        self.last_sent = loop.time()
        failure: Optional[Exception] = None
        async with anyio.create_task_group() as group:
            group.start_soon(self._until_disconnect, receive, group.cancel_scope)
            group.start_soon(self._watch, loop, send, group.cancel_scope)
            try:
                await self._write(loop, send)
            except Exception as exc:  # noqa: BLE001 - raised below, outside the group (not wrapped)
                failure = exc
            group.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _write(self, loop: asyncio.AbstractEventLoop, send: Send) -> None:
        try:
            async for item in self.events:
                self.sending_since = loop.time()
                await send({"type": "http.response.body", "body": frame(item), "more_body": True})
                if self.on_first is not None:
                    self.on_first()
                    self.on_first = None
                self.last_sent, self.sending_since = loop.time(), None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()  # cancels the job at once, whatever ended the stream

    @staticmethod
    async def _until_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _watch(self, loop: asyncio.AbstractEventLoop, send: Send, scope: anyio.CancelScope) -> None:
        """Once a tick: drop a client whose send has waited past send_timeout; ping a quiet stream."""
        while True:
            await anyio.sleep(self.tick)
            now = loop.time()
            if self.sending_since is not None:
                if now - self.sending_since > self.send_timeout:
                    break
            elif self.ping and now - self.last_sent >= self.ping:
                self.last_sent = now
                with anyio.move_on_after(self.send_timeout) as waited:
                    await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
                if waited.cancelled_caught:
                    break
        log.warning("a client stopped reading its stream for %ss; dropped", self.send_timeout)
        scope.cancel()


def event_response(events: AsyncIterator[dict[str, str]], job: Job,
                   error_event: Callable[[LocalGemmaError], dict[str, str]]) -> EventStream:
    """The stream's events as SSE. The 200 is sent by now, so a failure becomes one last event,
    `error_event(error)`, in the API's own shape; the job stops when the stream does (the client
    left, or the answer is complete)."""
    async def guarded() -> AsyncIterator[dict[str, str]]:
        try:
            async for item in events:
                yield item
        except Exception as exc:  # noqa: BLE001 - mid-stream: say it in the stream
            error = exc if isinstance(exc, LocalGemmaError) else InternalError(
                f"generation failed ({type(exc).__name__})")
            log.warning("stream failed after its first chunk: %s", error.message)
            yield error_event(error)
        finally:
            job.cancel()

    # Events are exactly `data: ...\n\n`, as Workers AI and OpenAI send them.
    return EventStream(guarded(), on_first=job.sent_first)


async def begin(request: Request, scheduler: Scheduler, model: Optional[str], inputs: Any,
                hold_first: Optional[bool] = None, **options: Any) -> tuple[Job, Any]:
    """Queue the request, start it, and return (job, its first item). A failure before the
    first item is raised here; a client that leaves meanwhile cancels the job (Aborted).
    `hold_first` (default: whether the inputs stream): the response will call
    `job.sent_first()` once its first chunk is written, as event_response's does (see Job)."""
    job: Optional[Job] = None
    if hold_first is None:
        hold_first = bool(getattr(inputs, "stream", False))

    async def first() -> Any:
        nonlocal job
        job = await scheduler.start(model, inputs, hold_first=hold_first, **options)
        return await job.get()

    try:
        item = await unless_disconnected(request, first)
    except BaseException:
        if job is not None:
            job.cancel()
        raise
    if item is END:  # the job was cancelled before it produced anything
        raise client_gone()
    return job, item


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Await `work()`, cancelling it if the client disconnects first (then Aborted).
    The request body must already have been read: this listens on the same channel."""
    outcome: dict[str, Any] = {}

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        outcome["gone"] = True
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        try:
            outcome["value"] = await work()
        except Exception as exc:  # kept out of the task group, which would wrap it in a group
            outcome["error"] = exc
        group.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    if "value" not in outcome:
        raise client_gone()
    return outcome["value"]
