"""The HTTP server: Workers AI's REST surface and an OpenAI-style shim over the runtime.

    app.py           the app factory: its runtime, routers, health, auth, limits
    workers_ai.py    /client/v4/accounts/{id}/ai/... (run, finetunes), Cloudflare's envelope
    openai_shim.py   /v1/... translated into the contract (openai_types.py: its wire types)
    queue.py         per-model admission, generation threads, cancellation
    sse.py           first-chunk-then-commit streaming, disconnect watch, SSE framing
    errors.py        one error, rendered in the shape of the surface it came in on
    middleware.py    the catch-all, auth, body limits; protocol.py: head timeout, connection cap
    jsonbody.py      strict JSON bodies on every route
    cli.py           `localgemma serve` (its settings: localgemma.settings)

Importing the package loads none of them (`localgemma run` should not pay for FastAPI):
`create_app` is imported on first use.
"""

from ..lazy import names as _names

__all__ = ["create_app"]
__getattr__ = _names(__name__, {"create_app": "app"})
