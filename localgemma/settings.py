"""Every knob of a localgemma process, declared once: name, type, bounds, default, and the
environment variable (LOCALGEMMA_<NAME>) that sets it. The CLI's flags are generated from
these fields (`option`), so a flag, its variable and its default cannot drift apart.

Read at call time: `current()` builds a Settings from the environment as it is now, and the
server builds one from its flags (flags win over variables, variables over defaults). The
variables are read as pydantic-settings would read them -- the name in any case, lists and
dicts as JSON, everything else as text pydantic converts -- by `from_environment` below: that
package (and the YAML, dotenv and asyncio modules it imports) cost every cold start 35 ms of
imports and more at exit. `Settings(...)` itself reads no variable: build one with `current`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .environment import PREFIX, variables
from .errors import InvalidInput

ENV_PREFIX = PREFIX


class Settings(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    # -- models and compute -------------------------------------------------------------------
    home: Optional[Path] = Field(None, description="where models, bindings and finetunes live "
                                                   "(default: the platform's user data folder)")
    threads: Optional[int] = Field(None, ge=1, description="llama.cpp threads (default: the physical cores)")
    n_ctx: Optional[int] = Field(None, ge=64, description="context tokens per model (default: the catalog's, 8192, "
                                                          "or the largest that fits in memory)")
    kv_type: Literal["f16", "q8_0", "q4_0"] = Field("f16", description="KV cache type: q8_0 halves its memory, "
                                                    "q4_0 quarters it (see README: Memory)")
    verbose: bool = Field(False, description="show llama.cpp's own log")
    adapter_cache_mb: int = Field(1024, ge=1, description="LoRA adapters kept loaded per model (MiB)")
    max_lora_rank: int = Field(64, ge=1, description="largest LoRA rank a finetune may have")
    max_lora_mb: int = Field(500, ge=1, description="largest adapter file a finetune may have (MiB)")

    # -- serving ------------------------------------------------------------------------------
    exact: bool = Field(False, description="one request at a time per model, every answer exactly the "
                                           "solo one (no batching)")
    parallel: int = Field(4, ge=1, le=128, description="requests per model decoded together in one batch (llama.cpp "
                                                       "allows 256 sequences: as many again hold the prefix cache)")
    batch_ctx: int = Field(4096, ge=256, description="KV cells (tokens) shared by a model's batched requests; a "
                                                     "request too big for them runs alone")
    host: str = Field("127.0.0.1", description="address to listen on; anything but loopback exposes the "
                                               "models to the network: use --api-key")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on")
    api_key: Optional[str] = Field(None, description="require 'Authorization: Bearer KEY' on every route but /health")
    max_queue: int = Field(8, ge=0, description="requests that may wait per model while the running ones "
                                                "generate; more get 429 at once")
    max_body_mb: float = Field(10.0, gt=0, description="largest request body (MiB); bigger ones get 413 "
                                                       "(finetune uploads have max_lora_mb)")
    max_connections: int = Field(256, ge=1, description="open connections at most; more get 503 at once")
    cors_origins: list[str] = Field(default_factory=list, description="web origins (https://app.example:8443, or *) "
                                    "whose pages may call the API; the playground's own origin always may")
    allowed_hosts: list[str] = Field(default_factory=list, description="host names (besides localhost and the "
                                     "bound address) the server answers to: others are refused (DNS rebinding)")
    header_timeout: float = Field(10.0, gt=0, description="seconds for a request line and headers to arrive")
    body_timeout: float = Field(30.0, gt=0, description="seconds a request body may stall between chunks")
    server_debug: bool = Field(False, description="expose GET /debug/jobs (per-request counters)")
    models: dict[str, str] = Field(default_factory=dict, description="model id -> local GGUF, for this process")
    preload: bool = Field(True, description="load the served models at start")

    @field_validator("api_key")
    @classmethod
    def _no_empty_key(cls, key: Optional[str]) -> Optional[str]:
        if key is not None and not key.strip():
            raise ValueError("the key is empty, which would leave the server open to anyone; give a key, or "
                             "leave it out to run without one")
        return key

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_lora_bytes(self) -> int:
        return self.max_lora_mb * 2**20

    @property
    def served_models(self) -> list[str]:
        """The ids a server preloads and lists: the bound ones, or else the embedded model."""
        from .models.catalog import EMBEDDED_ID

        return list(self.models) or [EMBEDDED_ID]


_BUILT: dict[tuple, Settings] = {}


def current(**overrides: Any) -> Settings:
    """The settings now: overrides (e.g. CLI flags given), else the environment, else defaults.
    Building a Settings reads and validates every field (about 5 ms) and a request asks several
    times, so one is kept per (overrides, LOCALGEMMA_* variables): a changed variable still
    takes effect at the next call, and Settings is frozen, so sharing it is safe."""
    given = {k: v for k, v in overrides.items() if v is not None}
    key = (repr(sorted(given.items())),
           tuple(sorted(variables().items())))
    built = _BUILT.get(key)
    if built is None:
        built = _build(given)
        if len(_BUILT) >= 64:
            _BUILT.clear()
        _BUILT[key] = built
    return built


def from_environment(environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The fields the LOCALGEMMA_* variables set, as Settings' input: lists and dicts decoded
    from JSON (InvalidInput, naming the variable, when they are not), the rest as given."""
    found = variables(environ)
    values: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        raw = found.get(env_var(name))
        if raw is None:
            continue
        if _structured(field.annotation):
            try:
                values[name] = json.loads(raw)
            except ValueError:
                raise InvalidInput(f"{env_var(name)}: not JSON (got {raw!r}); give a JSON "
                                   f"{'object' if _origin(field.annotation) is dict else 'list'}") from None
        else:
            values[name] = raw
    return values


def _origin(annotation: Any) -> Any:
    return get_origin(annotation) or annotation


def _structured(annotation: Any) -> bool:
    return _origin(annotation) in (list, dict)


def _build(given: dict[str, Any], environment: bool = True) -> Settings:
    try:
        return Settings(**{**(from_environment() if environment else {}), **given})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "settings"
            where = f"--{name.replace('_', '-')} / {env_var(name)}"
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
        raise InvalidInput("; ".join(problems)) from None


def env_var(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def option(name: str, *flags: str, **kw: Any):
    """A click option for setting `name`: its help, default and variable come from the field.
    The option's own default is None, so a flag not given leaves the variable or default."""
    import click

    field = Settings.model_fields[name]
    default = field.default if field.default is not None else "unset"
    annotation = next((a for a in get_args(field.annotation) if a is not type(None)), field.annotation)
    kind = {int: int, float: float, bool: bool}.get(annotation, str)
    if getattr(field.annotation, "__origin__", None) is list:  # repeatable; none given: the variable or default
        help_text = f"{field.description[:1].upper()}{field.description[1:]} (repeatable; env {env_var(name)} as JSON)."
        return click.option(*flags, name, multiple=True, help=help_text,
                            callback=lambda ctx, param, value: list(value) or None, **kw)
    help_text = f"{field.description[:1].upper()}{field.description[1:]} (env {env_var(name)}; default {default})."

    def check(ctx, param, value):
        if value is not None:
            try:  # this flag's value alone: a bad variable is named as such when the command reads them
                _build({name: value}, environment=False)
            except InvalidInput as exc:
                raise click.BadParameter(exc.message.split(": ", 1)[-1]) from None
        return value

    if kind is bool:
        return click.option(*flags, name, is_flag=True, default=None, help=help_text, **kw)
    return click.option(*flags, name, type=kw.pop("type", kind), default=None, help=help_text, callback=check, **kw)
