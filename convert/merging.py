"""Fold LoRA adapters into a base GGUF: W' = W + sum_i scale_i * (alpha_i / r_i) * B_i A_i.

Route (measured on the embedded Gemma 3 270M Q4_K_M, whose 236 tensors mix F32, Q5_0, Q4_K,
Q8_0 and Q6_K because 640-wide rows do not fit K-quant blocks):

1. dequantize only the adapted weights (gguf.quants.dequantize), add the deltas in float32;
2. write an intermediate GGUF: the metadata's bytes and every other tensor's bytes copied
   untouched, the merged weights as F32. The base is read through the header reader
   (localgemma/gguf_header.py: milliseconds, the tokenizer's 262k-entry arrays are never
   parsed, only copied); tensors stream to disk one at a time, so memory holds one merged
   weight, not the model;
3. llama.cpp's quantizer (llama_quant.py) with every weight pinned to its base type (~0.6 s).
   It copies any tensor already in its pinned type byte for byte, so untouched tensors come
   out byte-identical (checked: 232 of 236 identical after merging 4), and it quantizes the
   merged F32 weights with llama.cpp's own reference code, K-quants included. (Requantizing a
   weight's own dequantized values gives back the same bytes for Q5_0, Q8_0 and Q4_K here;
   Q6_K moves by at most 0.002.)

Pinning beats asking for the base's file type (LLAMA_FTYPE_MOSTLY_Q4_K_M) and trusting the
quantizer's per-tensor heuristics: those reproduce this file today, but a GGUF made by another
llama.cpp version or with hand-picked --tensor-type overrides would be requantized tensor by
tensor (dequantize + quantize, lossy) wherever the heuristics now disagree. With pins, and
allow_requantize off, that cannot happen silently. gguf-py's numpy quantize was not an option:
it has no K-quants. An explicit `out_type` (e.g. "Q8_0", "F16") uses the quantizer's standard
mix for that type instead, converting untouched tensors too.

A base whose adapted weights are F32/F16/BF16 skips steps 2-3: numpy rounds to those types
exactly as llama.cpp does, so the merged weights are written in their own type directly.
"""

from __future__ import annotations

import math
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import gguf
import numpy as np

from ..errors import ConversionError
from ..files import atomic_output
from ..gguf_header import Header, read_header, tensor_bytes
from .gguf_lora import BaseModel, GgufAdapter, check_output_path, read_adapter, read_base
from .llama_quant import ftype_name, ftype_of, run_quantizer
from .lora import peft_to_gguf

Progress = Callable[[int, int], None]  # (steps done, steps in all)
_F32 = gguf.GGMLQuantizationType.F32
_NUMPY_TYPES = (_F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


@dataclass(frozen=True)
class MergeInfo:
    out_path: Path
    out_type: str  # the file type written, e.g. "Q4_K_M"
    merged: tuple[str, ...]  # base tensors that changed, e.g. ("blk.0.attn_q.weight", ...)


def merge(base_gguf: str | Path, adapters: Sequence[tuple[str | Path, float]], out_path: str | Path, *,
          out_type: Optional[str] = None, progress: Optional[Progress] = None) -> MergeInfo:
    """Merge `adapters` ((GGUF adapter or PEFT folder, scale) pairs) into `base_gguf`.

    out_type None keeps every tensor's type from the base (see the module docstring);
    otherwise it names a llama.cpp file type ("Q4_K_M", "Q8_0", "F16", ...). `progress`, if
    given, is called as progress(done, total): one step per merged weight, one to finish.
    """
    base_path = Path(base_gguf)
    out = check_output_path(out_path, base_path, *(path for path, _ in adapters))
    _check_adapter_list(adapters)
    target_ftype = ftype_of(out_type) if out_type else None
    base = read_base(base_path)
    reader = read_header(base_path)
    base_ftype = reader.get("general.file_type")
    if target_ftype is None and base_ftype is None:
        raise ConversionError(f"{base_path} does not record its file type (general.file_type); pass out_type, e.g. Q8_0")
    keep_ftype = base_ftype if target_ftype in (None, base_ftype) else None
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merge-") as tmpdir:
        loaded = [(_load_adapter(Path(path), base, Path(tmpdir) / f"adapter{i}.gguf"), float(scale))
                  for i, (path, scale) in enumerate(adapters)]
        merger = _Merger(reader, loaded, progress or (lambda done, total: None))
        with atomic_output(out) as tmp:
            _write_merged(merger, tmp, Path(tmpdir), keep_ftype, target_ftype)
        merger.report(merger.total, merger.total)
    written = keep_ftype if keep_ftype is not None else target_ftype
    return MergeInfo(out, ftype_name(written) or str(written), tuple(merger.names))


def merge_reference(base_gguf: str | Path, adapters: Sequence[tuple[str | Path, float]],
                    out_path: str | Path) -> MergeInfo:
    """The adapters folded into dequantized weights, kept as F32; every other tensor's bytes
    untouched. Not for serving (adapted weights grow 4-8x): the reference `finetune verify`
    compares the runtime's adapter against, free of any requantization error."""
    base_path = Path(base_gguf)
    out = check_output_path(out_path, base_path, *(path for path, _ in adapters))
    _check_adapter_list(adapters)
    base = read_base(base_path)
    reader = read_header(base_path)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merge-") as tmpdir:
        loaded = [(_load_adapter(Path(path), base, Path(tmpdir) / f"adapter{i}.gguf"), float(scale))
                  for i, (path, scale) in enumerate(adapters)]
        merger = _Merger(reader, loaded, lambda done, total: None)
        with atomic_output(out) as tmp:
            write_model(reader, tmp, {n: _F32 for n in merger.names}, merger.weight)
    return MergeInfo(out, "F32 (adapted tensors only)", tuple(merger.names))


def _check_adapter_list(adapters: Sequence[tuple[str | Path, float]]) -> None:
    if not adapters:
        raise ConversionError("merge needs at least one adapter (a GGUF LoRA or a PEFT folder) with a scale")
    for path, scale in adapters:
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConversionError(f"the scale for {path} is {scale!r}; expected a finite number such as 1.0")


def _load_adapter(path: Path, base: BaseModel, scratch: Path) -> GgufAdapter:
    """A GGUF adapter as-is; a PEFT folder converted first (no serving limits on rank or size)."""
    if path.is_dir():
        path = peft_to_gguf(path, base.path, scratch, max_rank=2**31, max_bytes=2**62).out_path
    elif not path.is_file():
        raise ConversionError(f"no adapter at {path}; pass a GGUF LoRA file or a PEFT folder")
    adapter = read_adapter(path)
    if adapter.arch != base.arch:
        raise ConversionError(f"{path} is an adapter for {adapter.arch!r} but the base {base.path.name} "
                              f"is {base.arch!r}")
    for name, (a, b) in adapter.pairs.items():
        base.check_pair(name, a, b, str(path))
    return adapter


@dataclass(frozen=True)
class _Tensor:
    """A base tensor: name, ggml type, numpy shape, and its stored bytes (a memory-map view)."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    raw: memoryview

    @property
    def data(self) -> np.ndarray:
        """The stored bytes shaped as gguf.quants expects them (uint8 rows of blocks)."""
        byte_shape = gguf.quants.quant_shape_to_byte_shape(self.shape, self.tensor_type)
        return np.frombuffer(self.raw, dtype=np.uint8).reshape(byte_shape)


def _tensors(header: Header) -> list[_Tensor]:
    try:
        return [_Tensor(t.name, gguf.GGMLQuantizationType(t.type), t.shape, tensor_bytes(header, t))
                for t in header.tensors.values()]
    except ValueError as exc:
        raise ConversionError(f"{header.path.name}: {exc}") from None


class _Merger:
    """Computes merged weights on demand, in the base's tensor order, reporting progress."""

    def __init__(self, reader: Header, adapters: list[tuple[GgufAdapter, float]], report: Progress):
        self.reader, self.adapters, self.report = reader, adapters, report
        self.tensors = _tensors(reader)
        self.names = [t.name for t in self.tensors if any(t.name in a.pairs for a, _ in adapters)]
        self.types = {t.name: t.tensor_type for t in self.tensors}
        self.total = len(self.names) + 1
        self.done = 0

    def weight(self, tensor: _Tensor) -> np.ndarray:
        """W + sum of the adapters' deltas, float32 in numpy order [n_out, n_in]."""
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(tensor.shape)
        for adapter, scale in self.adapters:
            if tensor.name in adapter.pairs:
                weight += adapter.delta(tensor.name, scale)
        self.done += 1
        self.report(self.done, self.total)
        return weight


def _write_merged(merger: _Merger, out: Path, scratch: Path, keep_ftype: Optional[int],
                  target_ftype: Optional[int]) -> None:
    """Write the merged model to `out`: base types kept (keep_ftype set) or target_ftype's mix."""
    types = merger.types
    if keep_ftype is not None and all(types[name] in _NUMPY_TYPES for name in merger.names):
        write_model(merger.reader, out, {n: types[n] for n in merger.names},
                    lambda t: gguf.quants.quantize(merger.weight(t), t.tensor_type))
        return
    intermediate = scratch / "merged-f32.gguf"
    write_model(merger.reader, intermediate, {n: _F32 for n in merger.names}, merger.weight)
    if keep_ftype is not None:
        _quantize_as_base(merger.reader, keep_ftype, intermediate, out)
    else:
        run_quantizer(intermediate, out, target_ftype, allow_requantize=True)


def write_model(reader: Header, path: Path, replaced: dict[str, gguf.GGMLQuantizationType],
                produce: Callable[[_Tensor], np.ndarray]) -> None:
    """Copy the GGUF behind `reader` to `path` -- the metadata's bytes as they are, every
    tensor's bytes -- except the tensors named in `replaced`: written in the given type, with
    data from produce(tensor) (numpy order, already in that type's layout), called one tensor at
    a time while writing. Same tensor order, same alignment as the base."""
    alignment = int(reader.get("general.alignment", 32))
    tensors = _tensors(reader)
    infos, sizes, offset = [], [], 0
    for t in tensors:
        kind = replaced.get(t.name, t.tensor_type)
        nbytes = len(t.raw) if t.name not in replaced else \
            int(np.prod(gguf.quants.quant_shape_to_byte_shape(t.shape, kind)))
        name = t.name.encode()
        dims = tuple(reversed(t.shape))  # GGUF stores ne[0] (the row length) first
        infos.append(struct.pack(f"<Q{len(name)}sI{len(dims)}QIQ", len(name), name, len(dims), *dims, int(kind), offset))
        sizes.append(nbytes)
        offset += -(-nbytes // alignment) * alignment
    kv_start, kv_end = reader.kv_span
    with open(path, "wb") as out:
        out.write(struct.pack("<4sIQQ", b"GGUF", reader.version, len(tensors), len(reader.fields)))
        out.write(memoryview(reader._map)[kv_start:kv_end])
        out.write(b"".join(infos))
        out.write(b"\0" * (-out.tell() % alignment))
        for t, nbytes in zip(tensors, sizes):
            if t.name in replaced:
                data = np.ascontiguousarray(produce(t))
                if data.nbytes != nbytes:
                    raise ConversionError(f"{t.name}: {data.nbytes} bytes produced for a slot of {nbytes}")
                out.write(data.tobytes())
            else:
                out.write(t.raw)
            out.write(b"\0" * (-nbytes % alignment))


_UNQUANTIZED = (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16)


def _quantize_as_base(reader: Header, base_ftype: int, intermediate: Path, out: Path) -> None:
    """Every weight back to the type it has in the base (see the module docstring)."""
    pins = {t.name: int(t.type) for t in reader.tensors.values() if len(t.shape) >= 2}
    run_quantizer(intermediate, out, base_ftype, pins=pins, allow_requantize=False)
    if base_ftype in _UNQUANTIZED:
        # llama.cpp ignores pins for F32/F16/BF16 file types: check what it did instead.
        written = {t.name: t.type for t in read_header(out).tensors.values()}
        name = lambda kind: gguf.GGMLQuantizationType(kind).name  # noqa: E731
        changed = [f"{t.name} ({name(t.type)} -> {name(written[t.name])})"
                   for t in reader.tensors.values() if written[t.name] != t.type]
        if changed:
            raise ConversionError(f"llama.cpp would change the type of {', '.join(changed[:3])}; "
                                  "pass an explicit out_type (e.g. F16) to accept that")
