"""Atomic outputs: a converted file appears whole under its name, or not at all."""

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
    tmp = out_path.parent / f".{out_path.name}.{secrets.token_hex(4)}.partial"
    # os.open with 0o666 (not mkstemp's 0o600) so the result gets the user's usual permissions.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield Path(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
