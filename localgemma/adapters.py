"""LoRA adapters on a loaded base: each GGUF adapter loaded once through llama.cpp's adapter
API, kept in a least-recently-used cache under a memory budget, and switched per request
with `llama_set_adapters_lora` — the base model is never reloaded.

Callers hold the engine's lock: the cache and the context's active set are not thread-safe.
"""

from __future__ import annotations

import ctypes
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .bindings import llama_cpp
from .errors import AdapterGone, AdapterMismatch, LocalGemmaError
from .generation import AdapterRef


@dataclass
class _Loaded:
    handle: object
    size: int


class AdapterCache:
    def __init__(self, model, *, budget: Optional[int] = None):
        from .settings import current

        self._model = model
        self.budget = budget if budget is not None else current().adapter_cache_mb * 2**20
        self._loaded: "OrderedDict[str, _Loaded]" = OrderedDict()
        self._active: tuple = ()
        self.loads = 0  # how many times a file was read (tests check reuse)

    def handle(self, path: str, keep: frozenset = frozenset()):
        entry = self._loaded.get(path)
        if entry is not None:
            self._loaded.move_to_end(path)
            return entry.handle
        self._drop_stale()
        if not os.path.isfile(path):
            raise AdapterGone(f"the adapter file {Path(path).name} is gone (its finetune was deleted or replaced); "
                              "send the request again")
        handle = llama_cpp.llama_adapter_lora_init(self._model, path.encode())
        if not handle:
            raise AdapterMismatch(
                f"llama.cpp could not apply the adapter {Path(path).name} to this base model: it was "
                f"made for another base (architecture or tensor shapes differ), or the file is damaged"
            )
        self.loads += 1
        self._loaded[path] = _Loaded(handle, os.path.getsize(path))
        self._evict(keep | {path})
        return handle

    def _drop_stale(self) -> None:
        """Free adapters whose file is gone: a finetune re-uploaded or deleted gets a new path
        (finetunes.py), so its old handle will never be asked for again."""
        active = {id(h) for h, _ in self._active}
        for path in [p for p, e in self._loaded.items() if id(e.handle) not in active and not os.path.exists(p)]:
            llama_cpp.llama_adapter_lora_free(self._loaded.pop(path).handle)

    def _evict(self, keep: frozenset) -> None:
        """Free least-recently-used adapters until the budget holds (never one being asked for,
        never one active on the context)."""
        active = {id(h) for h, _ in self._active}
        while sum(e.size for e in self._loaded.values()) > self.budget:
            victim = next((p for p, e in self._loaded.items() if p not in keep and id(e.handle) not in active), None)
            if victim is None:
                return
            llama_cpp.llama_adapter_lora_free(self._loaded.pop(victim).handle)

    def activate(self, ctx, refs: Sequence[AdapterRef]) -> bool:
        """Make `refs` the context's adapter set; True when the set changed."""
        paths = frozenset(r.path for r in refs)
        wanted = tuple((self.handle(r.path, paths), float(r.scale)) for r in refs)
        if [(id(h), s) for h, s in wanted] == [(id(h), s) for h, s in self._active]:
            return False
        n = len(wanted)
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[h for h, _ in wanted])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in wanted])
        rc = llama_cpp.llama_set_adapters_lora(ctx, handles if n else None, n, scales if n else None)
        if rc != 0:
            raise LocalGemmaError(f"llama.cpp refused the adapter set (code {rc})")
        self._active = wanted
        return True

    def close(self) -> None:
        self._active = ()
        for entry in self._loaded.values():
            llama_cpp.llama_adapter_lora_free(entry.handle)
        self._loaded.clear()
