"""The app factory: settings -> a FastAPI app with both surfaces, health, auth and limits.

    create_app(current(models={"@cf/google/gemma-2b-it-lora": "~/gguf/gemma-2b-it.gguf"}))  # settings.current

The app owns its runtime (engines and batchers, built from the settings), its scheduler and
its preloader, in `app.state`: nothing is a module global another door could change.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from localgemma import __version__
from localgemma.runtime import Runtime
from localgemma.settings import Settings

from . import errors, ollama, openai_shim, playground, responses, workers_ai
from .middleware import BearerAuth, BodyLimit, BrowserGuard, Guard
from .queue import Scheduler

# Finetune uploads carry whole adapter files: they get the registry's own size cap (plus room
# for the multipart framing) instead of the run routes' body limit.
MULTIPART_SLACK = 2**20

log = logging.getLogger("localgemma.server")


class Preloader:
    """Loads the served models in a background thread at startup; /health reports it."""

    def __init__(self, runtime: Runtime, models: list[str]):
        self.runtime = runtime
        self.state: dict[str, str] = {m: "loading" for m in models}
        self._thread = threading.Thread(target=self._load, name="localgemma-preload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _load(self) -> None:
        from localgemma import finetunes

        try:
            finetunes.sweep()  # what a killed process left in the registry
        except OSError as exc:
            log.warning("could not clean the finetune registry: %s", exc)
        for model in self.state:
            try:
                self.runtime.load(model)
                self.state[model] = "ready"
            except Exception as exc:  # noqa: BLE001 - reported by /health, and by each request
                log.error("could not load %s: %s", model, exc)
                self.state[model] = f"error: {getattr(exc, 'message', exc)}"

    def status(self) -> str:
        states = self.state.values()
        if all(s == "ready" for s in states):
            return "ok"
        return "error" if any(s.startswith("error") for s in states) else "loading"


def create_app(settings: Settings) -> FastAPI:
    from localgemma.models import bind

    for model_id, path in settings.models.items():
        bind(model_id, path, persist=False)  # this process only; refuses a missing or non-GGUF file
    app = FastAPI(title="localgemma", version=__version__, lifespan=_lifespan, redirect_slashes=False,
                  docs_url=None, redoc_url=None,  # playground.py serves them with assets from a package
                  description="Workers AI's LoRA Gemma models, served locally; and OpenAI-style and Ollama APIs.")
    app.state.settings = settings
    app.state.runtime = runtime = Runtime(settings, exact=settings.exact)
    app.state.scheduler = Scheduler(runtime, settings.max_queue, slots=1 if settings.exact else settings.parallel)
    app.state.preloader = Preloader(runtime, settings.served_models if settings.preload else [])
    errors.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, idle=settings.body_timeout,
                       larger=[(workers_ai.ASSETS_PATH, settings.max_lora_bytes + MULTIPART_SLACK)])
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    if settings.cors_origins:  # outside auth: a preflight carries no key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(BrowserGuard, bound=settings.host, allowed_hosts=settings.allowed_hosts,
                       cors_origins=settings.cors_origins)
    app.add_middleware(Guard)  # added last: runs first
    app.include_router(workers_ai.make_router())
    app.include_router(openai_shim.make_router())
    app.include_router(responses.make_router())
    app.include_router(ollama.make_router())
    app.add_api_route("/health", health, methods=["GET"], tags=["Operations"])
    playground.install(app)
    if settings.server_debug:
        app.add_api_route("/debug/jobs", debug_jobs, methods=["GET"], tags=["Operations"])
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.preloader.start()
    yield
    await anyio.to_thread.run_sync(app.state.scheduler.shutdown)
    await anyio.to_thread.run_sync(app.state.runtime.close)


async def health(request: Request):
    """200 once every served model is loaded; 503 while loading (or if one failed)."""
    preloader: Preloader = request.app.state.preloader
    status = preloader.status()
    return JSONResponse({"status": status, "models": dict(preloader.state)}, status_code=200 if status == "ok" else 503)


async def debug_jobs(request: Request) -> dict[str, Any]:
    """Per-request generation counters (LOCALGEMMA_SERVER_DEBUG=1 only)."""
    return {"jobs": [s.to_dict() for s in request.app.state.scheduler.history]}
