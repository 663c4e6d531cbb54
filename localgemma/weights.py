"""Loading a GGUF's weights through llama.cpp: the checks first, then the load itself.

Kept apart from engine.py so that it imports nothing but llama_cpp and a few light modules:
localgemma.preload runs `load` on a thread while the rest of start-up (pydantic, the
contract, the memory plan) is still being imported, so that thread must not import anything
of its own.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path
from typing import Optional

from . import system
from .bindings import llama_cpp
from .errors import InsufficientMemory, LocalGemmaError

_backend_ready = False
_backend_lock = threading.Lock()
_verbose: Optional[bool] = None  # the handler installed: printing (True) or silent (False)


@llama_cpp.llama_log_callback
def _print_log(level: int, text: bytes, _user) -> None:
    print(text.decode(errors="replace"), end="", file=sys.stderr, flush=True)


def _silent_log() -> Optional[ctypes._CFuncPtr]:
    """A C function to hand llama.cpp as its log handler when nothing is to be shown.

    A Python callback would do, but every call needs the GIL: a model loading on one thread
    (its ~700 log lines) while another runs Python waits up to the switch interval (5 ms) per
    line -- 0.6 s became 3.6 s. libc's `abs` ignores the text and user-data arguments (every
    C calling convention leaves extra arguments to the caller) and touches no memory. None
    where there is no libc to ask (the Python handler is used)."""
    try:
        libc = ctypes.CDLL(None) if sys.platform != "win32" else ctypes.cdll.msvcrt
        return ctypes.cast(libc.abs, llama_cpp.llama_log_callback)
    except (OSError, AttributeError, TypeError):
        return None


_SILENT = _silent_log()


@llama_cpp.llama_log_callback
def _drop_log(level: int, text: bytes, _user) -> None:
    pass


def init_backend(verbose: bool) -> None:
    """llama.cpp's backend once per process, and its log handler: llama.cpp narrates every
    load (and tags some warnings as level NONE, which llama-cpp-python's own filter lets
    through); nothing is shown unless `verbose` (settings.verbose)."""
    global _backend_ready, _verbose
    with _backend_lock:
        if verbose != _verbose:
            handler = _print_log if verbose else (_SILENT or _drop_log)
            llama_cpp.llama_log_set(handler, ctypes.c_void_p(0))
            _verbose = verbose
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def check_memory(path: Path, available: Optional[int] = None) -> None:
    """Refuse, with numbers, to load a model file bigger than the memory available."""
    size = path.stat().st_size
    available = system.available_memory() if available is None else available
    if available is not None and size > available:
        raise InsufficientMemory(
            f"{path.name} needs {size / 2**20:,.0f} MiB but only {available / 2**20:,.0f} MiB of memory is "
            f"available; free memory or use a smaller quantization"
        )


def load(path: Path, *, verbose: bool, probe: bool = True) -> "llama_cpp.llama_model_p":
    """The model's weights, memory-mapped (pages shared with the OS cache). `probe`: check the
    file's header and, once per file, load it in a child process first (localgemma.probe), so
    a file llama.cpp would abort on cannot end this process. Only files this process made
    itself skip it. `verbose`: show llama.cpp's log. The caller frees the model
    (llama_model_free)."""
    if probe:
        from .probe import ensure_loadable

        ensure_loadable(path)
    check_memory(path)
    init_backend(verbose)
    mparams = llama_cpp.llama_model_default_params()
    mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise LocalGemmaError(f"llama.cpp could not load {path} (corrupt or unsupported GGUF?)")
    return model
