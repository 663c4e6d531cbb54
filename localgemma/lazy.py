"""A package's public names imported on first use (PEP 562), so importing the package is cheap:
`localgemma`, `localgemma.convert` and `localgemma.server` each set their `__getattr__` with it."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def names(package: str, homes: dict[str, str], *, submodules: bool = False) -> Callable[[str], Any]:
    """`__getattr__` for `package`: a name in `homes` comes from its module (`homes[name]`,
    relative); with `submodules`, any other name is tried as a submodule."""
    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(f".{homes[name]}", package), name)
        if submodules:
            try:
                return importlib.import_module(f".{name}", package)
            except ModuleNotFoundError:
                pass
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
