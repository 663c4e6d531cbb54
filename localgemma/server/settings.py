"""What one `localgemma serve` process is configured with. Only the CLI builds these from
flags; the app factory and the routes read them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 8
DEFAULT_PARALLEL = 4  # requests decoded together per model (localgemma.batching)
DEFAULT_MAX_BODY_MB = 10.0
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds for a request line and headers to arrive
DEFAULT_BODY_TIMEOUT = 30.0  # seconds a body may stall between chunks
DEFAULT_MAX_CONNECTIONS = 256  # open connections; more get 503 at once
# Finetune asset uploads carry whole adapter files: they get the registry's own size cap
# (plus room for the multipart framing) instead of the run routes' body limit.
MULTIPART_SLACK = 2**20


@dataclass(frozen=True)
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # model id -> local GGUF, bound for this process only (`--model ID=PATH`)
    models: dict[str, str] = field(default_factory=dict)
    api_key: Optional[str] = None
    # requests that may wait per model while one generates; past it: 429 at once
    max_queue: int = DEFAULT_MAX_QUEUE
    # requests generating at once per model, batched into shared decode steps
    parallel: int = DEFAULT_PARALLEL
    # one request at a time, every answer exactly the solo one (no batching)
    exact: bool = False
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    header_timeout: float = field(default_factory=lambda: float(os.environ.get("LOCALGEMMA_HEADER_TIMEOUT",
                                                                                DEFAULT_HEADER_TIMEOUT)))
    body_timeout: float = field(default_factory=lambda: float(os.environ.get("LOCALGEMMA_BODY_TIMEOUT",
                                                                              DEFAULT_BODY_TIMEOUT)))
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    preload: bool = True
    # exposes GET /debug/jobs (per-request generation counters) for tests and benchmarks
    debug: bool = field(default_factory=lambda: os.environ.get("LOCALGEMMA_SERVER_DEBUG") == "1")

    def __post_init__(self):
        if self.max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {self.max_queue}")
        if self.parallel < 1:
            raise ValueError(f"parallel: must be >= 1, got {self.parallel}")
        if self.max_body_mb <= 0:
            raise ValueError(f"max_body_mb: must be > 0, got {self.max_body_mb}")

    @property
    def served_models(self) -> list[str]:
        """The ids preloaded at startup and listed by /v1/models: the bound ones, or else
        the embedded model under its own id."""
        from localgemma.models import EMBEDDED_ID

        return list(self.models) or [EMBEDDED_ID]

    @property
    def slots(self) -> int:
        return 1 if self.exact else self.parallel

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_asset_bytes(self) -> int:
        from localgemma import finetunes

        return finetunes.MAX_BYTES + MULTIPART_SLACK


def parse_model_flag(text: str) -> tuple[str, str]:
    """`ID=PATH` -> (id, path); the first '=' separates (ids have none, paths might)."""
    model_id, sep, path = text.partition("=")
    if not sep or not model_id.strip() or not path.strip():
        raise ValueError(f"--model: {text!r} is not ID=PATH, e.g. @cf/google/gemma-2b-it-lora=~/gguf/gemma-2b-it.gguf")
    return model_id.strip(), os.path.expanduser(path.strip())
