"""Hostile GGUF files for the hardening tests: a copy of a real GGUF with one number changed
in its header (a metadata value, or one dimension of a tensor), written in place."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

from localgemma.gguf_header import _ARRAY, _SCALARS, _STRING, _Parser


class _Positions(_Parser):
    """The header walk, remembering where each scalar value and tensor dimension is stored."""

    def locate(self) -> tuple[dict[str, tuple[int, str]], dict[str, list[int]]]:
        self.pos = 4
        self.take("I")
        n_tensors, n_kv = self.take("Q"), self.take("Q")
        values, dims = {}, {}
        for _ in range(n_kv):
            key = self.string()
            kind = self.take("I")
            if kind in _SCALARS:
                values[key] = (self.pos, _SCALARS[kind])
            self.value(kind)
        for _ in range(n_tensors):
            name = self.string()
            n = self.take("I")
            dims[name] = [self.pos + 8 * i for i in range(n)]
            self.pos += 8 * n + 4 + 8
        return values, dims


def patched(src: Path, dst: Path, *, key: str | None = None, value=None, tensor: str | None = None,
            dim: int = 0, size: int | None = None) -> Path:
    """Copy `src` to `dst`, then set metadata `key` to `value` (same type), or dimension `dim`
    of `tensor` to `size`."""
    import mmap

    shutil.copyfile(src, dst)
    with open(dst, "r+b") as fh:
        view = mmap.mmap(fh.fileno(), 0)
        values, dims = _Positions(dst, view, dst.stat().st_size).locate()
        if key is not None:
            pos, fmt = values[key]
            struct.pack_into("<" + fmt, view, pos, value)
        if tensor is not None:
            struct.pack_into("<Q", view, dims[tensor][dim], size)
        view.flush()
        view.close()
    return dst


__all__ = ["patched", "_ARRAY", "_STRING"]
