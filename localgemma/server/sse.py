"""What both surfaces share between the scheduler and the wire: waiting for a job's first item
while watching for the client to leave, and server-sent events framed by sse-starlette.

A stream is committed to `text/event-stream` only once its first chunk exists: whatever
fails before the first token (validation, an unknown lora, a prompt too long for the context)
is still an ordinary JSON error with its own status.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar

import anyio
from fastapi import Request
from sse_starlette import EventSourceResponse

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


def event_response(events: AsyncIterator[dict[str, str]], job: Job,
                   error_event: Callable[[LocalGemmaError], dict[str, str]]) -> EventSourceResponse:
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

    # sep="\n": events are exactly `data: ...\n\n`, as Workers AI and OpenAI send them.
    return EventSourceResponse(guarded(), sep="\n", ping=PING_SECONDS, send_timeout=SEND_TIMEOUT)


async def begin(request: Request, scheduler: Scheduler, model: Optional[str], inputs: Any,
                **options: Any) -> tuple[Job, Any]:
    """Queue the request, start it, and return (job, its first item). A failure before the
    first item is raised here; a client that leaves meanwhile cancels the job (Aborted)."""
    job: Optional[Job] = None

    async def first() -> Any:
        nonlocal job
        job = await scheduler.start(model, inputs, **options)
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
