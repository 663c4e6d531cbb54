"""Load a model file nobody has loaded here before in a child process first.

llama.cpp ends the process on what it cannot handle (GGML_ASSERT, an uncaught C++ exception,
a NaN that trips an assert on the first decode), and `gguf_header.check_model` can only
refuse the numbers we know to check. So before this process loads a GGUF it has not seen, a
child loads it and decodes one token; if the child dies, the file is refused with what
llama.cpp said, and this process (a server, say) lives on. The verdict is remembered by path,
size and modification time in $LOCALGEMMA_HOME/probed.json, so the probe runs once per file
version (about a second, plus reading the weights from disk once).

The embedded model is trusted without a probe: it is assembled from its package and its
sha256 checked (models/store.py records it here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .errors import BadGGUF
from .gguf_header import check_model, read_header

TIMEOUT = 600  # seconds: a 7B file read from an SD card is slow, but not this slow
_lock = threading.Lock()


def _registry() -> Path:
    from .models import home

    return home() / "probed.json"


def _key(path: Path) -> tuple[str, list[int]]:
    st = path.stat()
    return str(path.resolve()), [st.st_size, st.st_mtime_ns]


def _known() -> dict:
    try:
        return json.loads(_registry().read_text())
    except (OSError, ValueError):
        return {}


def trust(path: Path, error: str | None = None) -> None:
    """Record the verdict on `path` as it is now: loadable (e.g. its sha256 was checked), or
    the error it gives."""
    from .files import write_atomic

    with _lock:
        name, stamp = _key(path)
        known = _known()
        known[name] = {"stamp": stamp, "error": error}
        write_atomic(_registry(), json.dumps(known, indent=1))


def ensure_loadable(path: str | os.PathLike) -> None:
    """Header checks, then (once per file version) a child-process load; BadGGUF if either fails."""
    path = Path(path)
    name, stamp = _key(path)
    verdict = _known().get(name)
    if not (isinstance(verdict, dict) and verdict.get("stamp") == stamp):
        check_model(read_header(path))  # a file seen before passed this already
        trust(path, _probe(path))
        verdict = _known()[name]
    if verdict.get("error"):
        raise BadGGUF(verdict["error"])


def _probe(path: Path) -> str | None:
    """None when a child process loaded `path` and decoded a token; else what went wrong."""
    code = "import sys; from localgemma.probe import _child; _child(sys.argv[1])"
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              timeout=TIMEOUT, env={**os.environ, "LOCALGEMMA_VERBOSE": "1"})
    except subprocess.TimeoutExpired:
        return f"{path.name}: llama.cpp did not finish loading it within {TIMEOUT} s"
    if done.returncode != 0:
        return f"{path.name} cannot be loaded: llama.cpp {_how(done.returncode)} ({_last_words(done.stderr)})"
    return None


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"crashed with {signal.Signals(-code).name}"
        except ValueError:
            return f"crashed with signal {-code}"
    return f"failed (exit status {code})"


def _last_words(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    telling = [ln for ln in lines if any(w in ln.lower() for w in ("error", "assert", "failed", "exception", "what()"))]
    text = "; ".join((telling or lines)[-2:]) or "no message"
    return text if len(text) <= 300 else text[:297] + "..."


def _child(path: str) -> None:
    """In the child: load, decode one token, exit 0; any failure exits non-zero."""
    from .engine import Engine

    engine = Engine(path, n_ctx=64, n_threads=1, probe=False)
    try:
        engine.logits([max(engine.bos, 0)])
    finally:
        engine.close()
