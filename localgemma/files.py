"""Files that appear whole or not at all: a reader sees the old file or the new one, and a
process killed midway leaves at most a hidden temp file (which the registry sweeps)."""

from __future__ import annotations

import hashlib
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output(out_path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out_path`; on success rename it into place.

    Same folder, so os.replace is an atomic rename on one filesystem; on any error (or Ctrl-C)
    the partial file is deleted and nothing exists under `out_path` that was not there before.
    """
    out_path = Path(out_path)
    tmp = out_path.parent / f".{out_path.name}.{secrets.token_hex(4)}.tmp"
    # os.open with 0o666 (not mkstemp's 0o600) so the result gets the user's usual permissions.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically, flushed to disk before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
