"""Cold start: read a model's weights on a thread while the rest of start-up runs.

Loading a GGUF is C work (llama.cpp maps and repacks the weights: about 0.45 s for the
embedded model) that releases the GIL; the rest of a cold `localgemma run` is Python work
that holds it (pydantic and the contract, the runtime, the request's validation, the memory
plan: about 0.3 s). Done one after the other they add up; here they overlap.

A process about to run one model wraps its start in `cold(model)`: the weights start loading
(weights.load, with every check it makes: the probe, the memory check) and `Engine` takes
them (`take`) instead of loading them itself. Nothing else changes: a failed load raises in
`Engine`, as it would have, and weights nobody took -- the request was refused before its
engine was built -- are freed when the block ends.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from .environment import variables


class Pending:
    """The weights one thread is reading: `result()` waits for them (or raises what failed).
    (concurrent.futures would do, but its import is on the path to starting the load.)"""

    def __init__(self):
        self._done = threading.Event()
        self._value: Any = None
        self._error: Optional[BaseException] = None

    def finish(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


_lock = threading.Lock()
_pending: dict[Path, Pending] = {}


def start(model: Optional[str]) -> Optional[Path]:
    """Start loading `model`'s weights unless they are loading already; the path, or None
    when there is nothing to do here (the file is not here yet, or the model is unknown:
    the request itself will say so)."""
    from .errors import LocalGemmaError
    from .models import local_path

    if "LOCALGEMMA_VERBOSE" in variables():
        return None  # llama.cpp's log may be wanted, and reading settings costs pydantic: load as before
    try:
        path = local_path(model)
    except LocalGemmaError:
        return None
    if path is None:
        return None
    path = path.resolve()
    from . import weights  # imported here, not on the thread: an import there would contend for the lock

    with _lock:
        if path in _pending:
            return None
        pending = _pending[path] = Pending()
    threading.Thread(target=_load, args=(weights, path, pending), name="localgemma-preload", daemon=True).start()
    return path


def _load(weights, path: Path, pending: Pending) -> None:
    try:
        pending.finish(weights.load(path, verbose=False))
    except BaseException as exc:  # noqa: BLE001 - handed to whoever takes it
        pending.finish(error=exc)


def take(path: Path) -> Optional[Pending]:
    """The weights being read for `path`, now the caller's to free; None if no preload has
    them."""
    with _lock:
        return _pending.pop(Path(path).resolve(), None) if _pending else None


def discard(path: Path) -> None:
    """Free `path`'s preloaded weights if nobody took them (waits for the load to end)."""
    pending = take(path)
    if pending is None:
        return
    try:
        model = pending.result()
    except BaseException:  # noqa: BLE001 - nobody asked for these weights: nothing to report
        return
    from .bindings import llama_cpp

    llama_cpp.llama_model_free(model)


@contextmanager
def cold(model: Optional[str], *, enabled: bool = True) -> Iterator[None]:
    """Preload `model` for the block when this process has no model loaded yet."""
    path = start(model) if enabled and "localgemma.engine" not in sys.modules else None
    try:
        yield
    finally:
        if path is not None:
            discard(path)
