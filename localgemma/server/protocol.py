"""uvicorn's HTTP/1.1 protocol with the two guards it lacks, below the ASGI app:

- a deadline for the request head: a connection that has not sent a complete request line and
  headers within `header_timeout` seconds (from connecting, or from the end of its previous
  response) gets 408 and is closed. uvicorn waits forever, so a few hundred half-sent requests
  held a file descriptor each until the process ran out (and /health stopped answering);
- a cap on open connections: past `max_connections`, a new connection gets 503 at once and is
  closed, before it can hold anything.

The body has its own idle timeout, in the ASGI layer (middleware.BodyLimit), where the error
can be rendered in the shape of the API the request came in on.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from localgemma.errors import LocalGemmaError, RequestTimeout, TooManyConnections

from .errors import envelope_body


def _raw_error(error: LocalGemmaError) -> bytes:
    """An answer written before any request was parsed (so in Workers AI's envelope)."""
    body = json.dumps(envelope_body(error)).encode()
    head = (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


def guarded_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol subclass bound to these limits (uvicorn takes a protocol class)."""

    class Guarded(H11Protocol):
        _deadline: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_raw_error(TooManyConnections(
                    f"too many open connections (more than {max_connections}); retry later")))
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the request head is in; the body has the ASGI layer's timeout

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # keep-alive: the next request's head gets the same deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:
                    # part of a request arrived: say why we hang up
                    self.transport.write(_raw_error(RequestTimeout(
                        f"the request line and headers did not arrive within {header_timeout:g} s")))
                self.transport.close()

    return Guarded
