"""A small, strict reader for `.safetensors` files (the format PEFT saves adapters in).

Why not the `safetensors` package: its numpy loader cannot return bfloat16 (the dtype most
adapters are trained and saved in), and on a damaged file it raises errors that name neither
the file nor what is wrong with it. The format is simple enough to read directly:

    [8 bytes: N, little-endian u64][N bytes: JSON header][data]

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, with the
offsets relative to the start of the data section; an optional "__metadata__" entry holds
strings. Every check below turns a truncated or corrupt file into a ConversionError that says
which file and what is wrong, instead of a numpy error or a silent wrong read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConversionError
from ..jsontext import strict_json

# safetensors dtype name -> (numpy dtype to read the raw bytes as, bytes per element).
# BF16 is read as raw uint16 and widened by hand (numpy has no bfloat16).
_DTYPES = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F64": (np.dtype("<f8"), 8),
}

# A header larger than this is not a LoRA adapter's header (thousands of tensors take ~100 KB).
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 (bf16/f16/f64 widened or narrowed exactly as stored)."""
        e = self.entries[name]
        np_dtype, _ = _DTYPES[e.dtype]
        count = math.prod(e.shape)
        raw = np.fromfile(self.path, dtype=np_dtype, count=count, offset=e.begin)
        if e.dtype == "BF16":
            # bfloat16 is the top half of a float32: shift the 16 bits into place.
            values = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.astype(np.float32)
        return values.reshape(e.shape)


def read_safetensors(path: str | Path) -> SafetensorsFile:
    """Parse and validate the header of `path`; tensors are read later, one at a time."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path} is not a safetensors file: it is {size} bytes long, "
                                  "shorter than the 8-byte header length it must start with")
        n = int.from_bytes(prefix, "little")
        if n > size - 8 or n > _MAX_HEADER_BYTES:
            raise ConversionError(f"{path} is truncated or not a safetensors file: its header "
                                  f"claims {n} bytes but the file has only {size - 8} after the length")
        header_bytes = f.read(n)
    try:
        header = strict_json(header_bytes.decode("utf-8"), constants=True)
    except ValueError as exc:  # not UTF-8, or not JSON
        raise ConversionError(f"{path} is corrupt: its JSON header does not parse ({exc})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} is corrupt: its header is a JSON {type(header).__name__}, "
                              "expected an object mapping tensor names to dtype/shape/offsets")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries = {name: _entry(path, name, info, data_start, size) for name, info in header.items()}
    return SafetensorsFile(path, entries, metadata if isinstance(metadata, dict) else {})


def _entry(path: Path, name: str, info: object, data_start: int, size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ConversionError(f"{where} is corrupt: expected an object with dtype, shape and "
                              f"data_offsets, found {str(info)[:80]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise ConversionError(f"{where} has dtype {dtype}; adapters must be saved as "
                              f"{', '.join(_DTYPES)} (float32, float16 or bfloat16)")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ConversionError(f"{where} has a malformed shape {shape!r}; expected a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ConversionError(f"{where} has malformed data_offsets {offsets!r}; expected [begin, end]")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    expected = math.prod(shape) * _DTYPES[dtype][1]
    if not data_start <= begin <= end:
        raise ConversionError(f"{where} is corrupt: data_offsets {offsets} are not increasing")
    if end > size:
        raise ConversionError(f"{where} is truncated: its data ends at byte {end} but the file "
                              f"has {size} bytes (an interrupted download or copy?)")
    if end - begin != expected:
        raise ConversionError(f"{where} is corrupt: shape {shape} in {dtype} needs {expected} "
                              f"bytes but data_offsets {offsets} span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)
