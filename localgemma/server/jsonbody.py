"""Request bodies as strict JSON on every route: no NaN or Infinity (not JSON, and poison for
every number they reach), and nesting too deep for Python's parser is a malformed body (400),
not a RecursionError (500).

The Workers AI routes read their body with `parse_json`; the /v1 routes let FastAPI parse it
into their pydantic types, through `StrictRoute`, whose requests decode JSON the same way.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from fastapi import Request
from fastapi.routing import APIRoute

from localgemma.errors import MalformedBody
from localgemma.jsontext import strict_json as loads

from .errors import Carried


def parse_json(body: bytes) -> Any:
    try:
        return loads(body)
    except UnicodeDecodeError:
        raise MalformedBody("malformed JSON body: it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if exc.doc else ""
        raise MalformedBody(f"malformed JSON body: {exc.msg}{where}; send one JSON object") from None


class _StrictRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = loads(body)
            except UnicodeDecodeError:  # FastAPI would answer its own "There was an error parsing the body"
                raise Carried(MalformedBody("malformed JSON body: it is not UTF-8 text")) from None
        return self._json


class StrictRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(_StrictRequest(request.scope, request.receive))

        return strict
