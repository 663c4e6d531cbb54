"""Fold LoRA adapters into a base GGUF: W' = W + sum_i scale_i * (alpha_i / r_i) * B_i A_i.

Route (measured on the embedded Gemma 3 270M Q4_K_M, whose 236 tensors mix F32, Q5_0, Q4_K,
Q8_0 and Q6_K because 640-wide rows do not fit K-quant blocks):

1. dequantize only the adapted weights (gguf.quants.dequantize), add the deltas in float32;
2. write an intermediate GGUF: every other tensor's bytes copied untouched, the merged weights
   as F32, all metadata copied (~1.5 s). Tensors stream to disk one at a time, so memory holds
   one merged weight, not the model;
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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import gguf
import numpy as np

from ..errors import ConversionError
from ..files import atomic_output
from .gguf_lora import (BaseModel, GgufAdapter, check_output_path, field, open_gguf, read_adapter, read_base,
                        read_gguf)
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
    reader = open_gguf(base_path)
    base_ftype = field(reader, "general.file_type")
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
    reader = open_gguf(base_path)
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


class _Merger:
    """Computes merged weights on demand, in the base's tensor order, reporting progress."""

    def __init__(self, reader: gguf.GGUFReader, adapters: list[tuple[GgufAdapter, float]], report: Progress):
        self.reader, self.adapters, self.report = reader, adapters, report
        self.names = [t.name for t in reader.tensors if any(t.name in a.pairs for a, _ in adapters)]
        self.types = {t.name: t.tensor_type for t in reader.tensors}
        self.total = len(self.names) + 1
        self.done = 0

    def weight(self, tensor) -> np.ndarray:
        """W + sum of the adapters' deltas, float32 in numpy order [n_out, n_in]."""
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
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


def write_model(reader: gguf.GGUFReader, path: Path, replaced: dict[str, gguf.GGMLQuantizationType],
                produce: Callable[[object], np.ndarray]) -> None:
    """Copy the GGUF behind `reader` to `path` (all metadata, every tensor's bytes), except the
    tensors named in `replaced`: written in the given type, with data from produce(tensor),
    called one tensor at a time while writing."""
    writer = gguf.GGUFWriter(str(path), field(reader, "general.architecture"))
    alignment = field(reader, "general.alignment")
    if alignment:
        writer.data_alignment = int(alignment)
    _copy_metadata(reader, writer)
    for t in reader.tensors:
        if t.name in replaced:
            shape = tuple(int(d) for d in reversed(t.shape))  # numpy order, e.g. [n_out, n_in]
            nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, replaced[t.name])))
            writer.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, raw_dtype=replaced[t.name])
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(produce(t) if t.name in replaced else t.data)
    writer.close()


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the header's own counts, and the key the writer adds itself
        if len(f.types) > 2:
            raise ConversionError(f"metadata {key} is a nested array, which this merge cannot copy")
        sub_type = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub_type)


_UNQUANTIZED = (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16)


def _quantize_as_base(reader: gguf.GGUFReader, base_ftype: int, intermediate: Path, out: Path) -> None:
    """Every weight back to the type it has in the base (see the module docstring)."""
    pins = {t.name: int(t.tensor_type) for t in reader.tensors if len(t.shape) >= 2}
    run_quantizer(intermediate, out, base_ftype, pins=pins, allow_requantize=False)
    if base_ftype in _UNQUANTIZED:
        # llama.cpp ignores pins for F32/F16/BF16 file types: check what it did instead.
        written = {t.name: t.tensor_type for t in read_gguf(out).tensors}
        changed = [f"{t.name} ({t.tensor_type.name} -> {written[t.name].name})"
                   for t in reader.tensors if written[t.name] != t.tensor_type]
        if changed:
            raise ConversionError(f"llama.cpp would change the type of {', '.join(changed[:3])}; "
                                  "pass an explicit out_type (e.g. F16) to accept that")
