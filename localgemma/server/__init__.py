"""The HTTP server: Workers AI's REST surface and an OpenAI-style shim over the runtime.

    settings.py      what a `serve` process is configured with
    app.py           the app factory: routers, health, auth, limits
    workers_ai.py    /client/v4/accounts/{id}/ai/... (run, finetunes), Cloudflare's envelope
    openai_shim.py   /v1/... translated into the contract (openai_types.py: its wire types)
    queue.py         per-model admission, generation threads, cancellation
    sse.py           first-chunk-then-commit streaming, disconnect watch, SSE framing
    errors.py        one error, rendered in the shape of the surface it came in on
    cli.py           `localgemma serve`
"""

from .app import create_app
from .settings import Settings

__all__ = ["create_app", "Settings"]
