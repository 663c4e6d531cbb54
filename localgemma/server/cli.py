"""`localgemma serve`: the HTTP server's door. The main CLI group attaches `serve`; it also
runs alone as `python -m localgemma.server`. Every flag is a field of localgemma.settings
(flag, variable and default declared there once)."""

from __future__ import annotations

import ipaddress
import os

import click

from localgemma.errors import LocalGemmaError
from localgemma.settings import current, option


def parse_model_flag(text: str) -> tuple[str, str]:
    """`ID=PATH` -> (id, path); the first '=' separates (ids have none, paths might)."""
    model_id, sep, path = text.partition("=")
    if not sep or not model_id.strip() or not path.strip():
        raise click.BadParameter(f"{text!r} is not ID=PATH, e.g. @cf/google/gemma-2b-it-lora=~/gguf/gemma-2b-it.gguf",
                                 param_hint="--model")
    return model_id.strip(), os.path.expanduser(path.strip())


@click.command("serve")
@option("host", "--host")
@option("port", "--port")
@click.option("--model", "models", multiple=True, metavar="ID=PATH",
              help="Serve model ID from a local GGUF (this process only; repeatable). "
                   "Default: the embedded Gemma 3 270M under its own id.")
@option("api_key", "--api-key")
@option("max_queue", "--max-queue")
@option("parallel", "--parallel")
@option("batch_ctx", "--batch-ctx")
@option("exact", "--exact")
@option("max_body_mb", "--max-body-mb")
@option("max_connections", "--max-connections")
@option("n_ctx", "--n-ctx")
@option("kv_type", "--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]))
@option("cors_origins", "--cors-origin")
@option("allowed_hosts", "--allowed-host")
def serve(models, **flags):
    """Serve Workers AI's REST API (/client/v4/accounts/ID/ai/...) and an OpenAI-style API (/v1)."""
    import uvicorn

    from localgemma.memory import pad_ctx

    from .app import create_app
    from .protocol import guarded_protocol

    try:
        settings = current(models=dict(parse_model_flag(m) for m in models) or None, **flags)
        app = create_app(settings)
    except LocalGemmaError as exc:
        raise click.UsageError(exc.message) from None
    contexts = []
    for model in settings.served_models:  # refuse now what would not fit, not at the first request
        try:
            contexts.append(app.state.runtime.plan(model)[0])
        except LocalGemmaError as exc:  # memory, or past the training context: said as run says it (exit 1)
            raise click.ClickException(exc.message) from None
    if not settings.api_key and not _is_loopback(settings.host):
        click.echo(f"warning: listening on {settings.host} without --api-key: anyone who can reach it can use it",
                   err=True)
    base = f"http://{settings.host}:{settings.port}"
    click.echo(f"localgemma: serving {', '.join(settings.served_models)} (loading; {base}/health says when ready)\n"
               f"  Workers AI: {base}/client/v4/accounts/local/ai/run/{settings.served_models[0]}\n"
               f"  OpenAI:     {base}/v1\n"
               f"  Ollama:     {base}/api (OLLAMA_HOST={settings.host}:{settings.port})\n"
               f"  Playground: {base}/\n"
               f"  Context:    {' / '.join(map(str, contexts))} tokens for a request run alone"
               + ("" if settings.exact else f", {pad_ctx(settings.batch_ctx)} shared by {settings.parallel} batched ones")
               + f"; KV cache {settings.kv_type}", err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5,
                http=guarded_protocol(settings.header_timeout, settings.max_connections))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
