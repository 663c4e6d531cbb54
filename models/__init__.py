"""Model catalog and local model store (installed as `localgemma.models`)."""

from .catalog import CATALOG, EMBEDDED_ID, ModelSpec
from .store import bind, bindings, embedded_path, home, local_path, pull, resolve, served_here, unbind

__all__ = [
    "CATALOG", "EMBEDDED_ID", "ModelSpec",
    "bind", "bindings", "embedded_path", "home", "local_path", "pull", "resolve", "served_here", "unbind",
]
