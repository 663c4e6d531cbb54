"""`localgemma serve`: the HTTP server's door. The main CLI group attaches `serve`; it also
runs alone as `python -m localgemma.server`."""

from __future__ import annotations

import ipaddress

import click

from localgemma.errors import LocalGemmaError

from .settings import (DEFAULT_HOST, DEFAULT_MAX_BODY_MB, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_QUEUE,
                       DEFAULT_PARALLEL, DEFAULT_PORT, Settings, parse_model_flag)


@click.command("serve")
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on. Anything but loopback exposes the models to the network: use --api-key.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model", "models", multiple=True, metavar="ID=PATH",
              help="Serve model ID from a local GGUF (this process only; repeatable). "
                   "Default: the embedded Gemma 3 270M under its own id.")
@click.option("--api-key", envvar="LOCALGEMMA_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health (env: LOCALGEMMA_API_KEY).")
@click.option("--max-queue", default=DEFAULT_MAX_QUEUE, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait per model while the running ones generate; more get 429 at once.")
@click.option("--parallel", envvar="LOCALGEMMA_PARALLEL", default=DEFAULT_PARALLEL, show_default=True,
              type=click.IntRange(min=1),
              help="Requests per model decoded together in one batch (continuous batching). Answers may differ "
                   "from solo ones at near-ties; requests with a seed always run alone and repeat exactly "
                   "(env: LOCALGEMMA_PARALLEL).")
@click.option("--batch-ctx", envvar="LOCALGEMMA_BATCH_CTX", type=click.IntRange(min=256), default=4096,
              show_default=True, help="KV cells (tokens) shared by a model's batched requests; a request "
                                      "too big for them runs alone.")
@click.option("--exact", is_flag=True,
              help="One request at a time per model, every answer exactly repeatable (no batching).")
@click.option("--max-body-mb", default=DEFAULT_MAX_BODY_MB, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Largest request body (MiB); bigger ones get 413. Finetune uploads have the registry's own cap.")
@click.option("--max-connections", default=DEFAULT_MAX_CONNECTIONS, show_default=True, type=click.IntRange(min=1),
              help="Open connections at most; more get 503 at once.")
def serve(host, port, models, api_key, max_queue, parallel, batch_ctx, exact, max_body_mb, max_connections):
    """Serve Workers AI's REST API (/client/v4/accounts/ID/ai/...) and an OpenAI-style API (/v1)."""
    import uvicorn

    from .app import create_app
    from .protocol import guarded_protocol

    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the key is empty, which would leave the server open to anyone; give a key, or "
                                 "leave --api-key (and LOCALGEMMA_API_KEY) out to run without one", param_hint="--api-key")

    try:
        bound = dict(parse_model_flag(m) for m in models)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("--model: "), param_hint="--model") from None
    settings = Settings(host=host, port=port, models=bound, api_key=api_key, max_queue=max_queue, parallel=parallel,
                        exact=exact, max_body_mb=max_body_mb, max_connections=max_connections)
    try:
        app = create_app(settings)
    except LocalGemmaError as exc:
        raise click.BadParameter(exc.message, param_hint="--model") from None
    if not api_key and not _is_loopback(host):
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    base = f"http://{host}:{port}"
    click.echo(f"localgemma: serving {', '.join(settings.served_models)} (loading; {base}/health says when ready)\n"
               f"  Workers AI: {base}/client/v4/accounts/local/ai/run/{settings.served_models[0]}\n"
               f"  OpenAI:     {base}/v1", err=True)
    from localgemma import runtime

    # Batching is a property of the process (runtime.configure), so it is set here, once the
    # process is surely the server's, not in create_app, which tests build in their own process.
    # Seeded requests still run alone and repeat exactly (localgemma.batching).
    runtime.configure(batching=not exact, exact=False, parallel=parallel, ctx=batch_ctx)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
                http=guarded_protocol(settings.header_timeout, settings.max_connections))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
