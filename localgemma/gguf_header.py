"""A GGUF header read in a few milliseconds, and checked before llama.cpp ever sees the file.

gguf-py's `GGUFReader` parses every array on open; Gemma's tokenizer holds 262,144 strings
and as many scores and types, so learning a tensor's shape that way took ~6 s. This reader
walks the header once with `struct` over a memory map: scalars and strings are decoded,
arrays are skipped (their position is kept, so the few that matter can be read on demand),
and tensor infos give names, shapes (numpy order), types and offsets.

llama.cpp trusts a GGUF's numbers: `block_count` 0 or 100000 trips a GGML_ASSERT, a NaN
`layer_norm_rms_epsilon` aborts on the first decode, a zero dimension divides by zero in
ggml. An abort ends the whole process (a server with it), so `check_model` refuses, naming the
key and the value, every number llama.cpp would choke on.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import BadGGUF, ModelUnavailable

MAGIC = b"GGUF"
# GGUF value types -> struct format (8: string and 9: array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_DIMS = 4
MAX_BLOCKS = 1024  # transformer layers; the largest open models have ~130
MAX_SIZE = 1 << 24  # any one hyperparameter (context, width, heads): 16M is far past real models


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: [n_out, n_in] for a weight (GGUF stores it reversed)
    type: int  # ggml type id
    offset: int  # from the start of the data section


@dataclass
class Header:
    path: Path
    version: int
    fields: dict[str, Any]  # scalars and strings; arrays as ArrayRef
    tensors: dict[str, Tensor]
    data_start: int
    file_size: int
    _map: Optional[mmap.mmap] = field(default=None, repr=False)
    kv_span: tuple[int, int] = (24, 24)  # where the metadata's bytes are: copied as-is by a merge

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def arch(self) -> str:
        return str(self.fields.get("general.architecture", ""))

    def hparam(self, name: str, default: Any = None) -> Any:
        """An architecture-scoped key: hparam("block_count") is "gemma3.block_count"."""
        return self.fields.get(f"{self.arch}.{name}", default)


@dataclass(frozen=True)
class ArrayRef:
    """An array left unparsed: its element type, length and where it starts."""

    type: int
    length: int
    offset: int


def read_header(path: str | Path) -> Header:
    """Parse a GGUF's header (metadata and tensor infos); BadGGUF for anything malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = path.stat().st_size
            if size < 24:
                raise BadGGUF(f"{path.name} is not a GGUF file: it is only {size} bytes long")
            view = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelUnavailable(f"cannot read {path}: {exc.strerror}") from None
    try:
        return _Parser(path, view, size).header()
    except (struct.error, UnicodeDecodeError, IndexError, ValueError, OverflowError) as exc:
        raise BadGGUF(f"{path.name} is not a readable GGUF file: its header is truncated or corrupt ({exc})") from None


class _Parser:
    def __init__(self, path: Path, view: mmap.mmap, size: int):
        self.path, self.view, self.size, self.pos = path, view, size, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.view, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        if n > self.size - self.pos:
            raise ValueError(f"a string of {n} bytes at offset {self.pos} runs past the end of the file")
        text = bytes(self.view[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("I"), self.take("Q")
            ref = ArrayRef(item, n, self.pos)
            if item in _SCALARS:
                width = struct.calcsize(_SCALARS[item])
                if n * width > self.size - self.pos:
                    raise ValueError(f"an array of {n} items at offset {self.pos} runs past the end of the file")
                self.pos += n * width
            elif item == _STRING:  # only the lengths are read: the tokenizer's 262k strings in ~0.1 s
                pos, view, size, length_at = self.pos, self.view, self.size, _U64.unpack_from
                for _ in range(n):
                    pos += 8 + length_at(view, pos)[0]
                    if pos > size:
                        raise ValueError("a string runs past the end of the file")
                self.pos = pos
            else:
                raise ValueError(f"an array of value type {item} (nested arrays are not used by llama.cpp)")
            return ref
        raise ValueError(f"unknown value type {kind} at offset {self.pos}")

    def header(self) -> Header:
        if self.view[:4] != MAGIC:
            raise BadGGUF(f"{self.path.name} is not a GGUF file (it does not start with 'GGUF')")
        self.pos = 4
        version, n_tensors, n_kv = self.take("I"), self.take("Q"), self.take("Q")
        if version not in (2, 3):
            raise BadGGUF(f"{self.path.name} is GGUF version {version}; llama.cpp reads versions 2 and 3")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise BadGGUF(f"{self.path.name} claims {n_tensors} tensors and {n_kv} metadata keys; that is not a model")
        fields = {}
        kv_start = self.pos
        for _ in range(n_kv):
            key = self.string()
            fields[key] = self.value(self.take("I"))
        kv_end = self.pos
        tensors = {}
        for _ in range(n_tensors):
            name = self.string()
            n_dims = self.take("I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise BadGGUF(f"{self.path.name}: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = [self.take("Q") for _ in range(n_dims)]
            kind, offset = self.take("I"), self.take("Q")
            tensors[name] = Tensor(name, tuple(reversed(dims)), kind, offset)
        alignment = fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise BadGGUF(f"{self.path.name}: general.alignment is {alignment!r}; expected a power of two")
        data_start = -(-self.pos // alignment) * alignment
        return Header(self.path, version, fields, tensors, data_start, self.size, self.view, (kv_start, kv_end))


def tensor_bytes(header: Header, tensor: Tensor) -> memoryview:
    """A tensor's data as stored (no copy: a view of the memory map)."""
    start = header.data_start + tensor.offset
    end = start + tensor_nbytes(tensor)
    if end > header.file_size:
        raise ValueError(f"tensor {tensor.name!r} runs past the end of {header.path.name}")
    return memoryview(header._map)[start:end]


def read_array(header: Header, key: str) -> list:
    """One array's values, parsed on demand (e.g. a few tokenizer entries)."""
    ref = header.fields.get(key)
    if not isinstance(ref, ArrayRef):
        raise KeyError(key)
    parser = _Parser(header.path, header._map, header.file_size)
    parser.pos = ref.offset
    return [parser.value(ref.type) for _ in range(ref.length)]


def tensor_nbytes(tensor: Tensor) -> int:
    """Bytes of a tensor's data, from ggml's block sizes (ValueError for an unknown type)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.type)]
    except (ValueError, KeyError):
        raise ValueError(f"tensor {tensor.name!r} has ggml type {tensor.type}, which this llama.cpp does not know") from None
    row = tensor.shape[-1]
    if row % block:
        raise ValueError(f"tensor {tensor.name!r} has rows of {row} values, not a multiple of its type's block of {block}")
    return math.prod(tensor.shape) // block * size


def check_model(header: Header) -> Header:
    """Refuse a model GGUF whose numbers llama.cpp would crash on (BadGGUF names which)."""
    name = header.path.name
    if header.get("general.type", "model") != "model":
        raise BadGGUF(f"{name} is a GGUF {header.get('general.type')!r}, not a model")
    if not header.arch:
        raise BadGGUF(f"{name} has no general.architecture")
    blocks = header.hparam("block_count")
    if not isinstance(blocks, int) or not 1 <= blocks <= MAX_BLOCKS:
        raise BadGGUF(f"{name}: {header.arch}.block_count is {blocks!r}; expected 1 to {MAX_BLOCKS}")
    present = {int(t.split(".")[1]) for t in header.tensors if t.startswith("blk.") and t.split(".")[1].isdigit()}
    if present and max(present) >= blocks:
        raise BadGGUF(f"{name} has tensors for block {max(present)} but {header.arch}.block_count is {blocks}")
    if present and len(present) < blocks:
        raise BadGGUF(f"{name}: {header.arch}.block_count is {blocks} but only {len(present)} blocks have tensors")
    for key, value in header.fields.items():
        if not key.startswith(header.arch + "."):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise BadGGUF(f"{name}: {key} is {value}; expected a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SIZE:
            raise BadGGUF(f"{name}: {key} is {value}; no real model has a value above {MAX_SIZE}")
    for key in ("embedding_length", "attention.head_count"):
        value = header.hparam(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise BadGGUF(f"{name}: {header.arch}.{key} is {value!r}; expected a positive whole number")
    eps = header.hparam("attention.layer_norm_rms_epsilon")
    if eps is not None and not (isinstance(eps, float) and 0 < eps < 1):
        raise BadGGUF(f"{name}: {header.arch}.attention.layer_norm_rms_epsilon is {eps!r}; expected a small "
                      "positive number such as 1e-6")
    data = header.file_size - header.data_start
    for tensor in header.tensors.values():
        if 0 in tensor.shape or math.prod(tensor.shape) > 1 << 40:
            raise BadGGUF(f"{name}: tensor {tensor.name!r} has shape {list(tensor.shape)}; every dimension must be "
                          "at least 1")
        try:
            nbytes = tensor_nbytes(tensor)
        except ValueError as exc:
            raise BadGGUF(f"{name}: {exc}") from None
        if tensor.offset + nbytes > data:
            raise BadGGUF(f"{name}: tensor {tensor.name!r} ends at byte {header.data_start + tensor.offset + nbytes} "
                          f"but the file has {header.file_size} (truncated download?)")
    return header
