"""The LOCALGEMMA_* variables, read by one rule -- the name in any case -- for settings.py and
for the two readers that run before pydantic is imported on a cold start (models.store.home,
preload.start)."""

from __future__ import annotations

import os
from typing import Mapping, Optional

PREFIX = "LOCALGEMMA_"


def variables(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """{LOCALGEMMA_NAME (upper case): value} for every such variable set."""
    environ = os.environ if environ is None else environ
    return {key.upper(): value for key, value in environ.items() if key.upper().startswith(PREFIX)}
