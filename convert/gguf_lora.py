"""GGUF side of LoRA conversion: what a base model holds, HF -> GGUF names, and the adapter file.

Shapes, once and for all. GGUF stores dimensions in ggml order (fastest-varying first), which is
numpy's order reversed. For a Gemma 3 270M query projection:

    GGUFReader tensor.shape (ggml): [n_in, n_out] = [640, 1024]
    numpy / PyTorch weight:         [n_out, n_in] = [1024, 640]
    PEFT lora_A (numpy):            [r, n_in]     = [8, 640]    -> GGUF "<T>.lora_a"
    PEFT lora_B (numpy):            [n_out, r]    = [1024, 8]   -> GGUF "<T>.lora_b"

Everything in this package speaks numpy order; `BaseModel` converts once, on reading.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..errors import ConversionError

# Gemma's GGUF weights are the Hugging Face weights unpermuted (Llama-family converters permute
# q/k rows for their RoPE layout, which an adapter's lora_B would then need too): that is why
# this converter is limited to the Gemma architectures.
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# The GGUF tensor kinds llama.cpp applies a text LoRA to (in gguf's own vocabulary).
_LORA_TENSORS = {
    gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V,
    gguf.MODEL_TENSOR.ATTN_OUT, gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP,
    gguf.MODEL_TENSOR.FFN_DOWN,
}


class _Reader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map instead of the np.memmap itself.

    GGUFReader slices its buffer once per metadata item; Gemma's tokenizer has 262,144 strings,
    so that is ~1M slices, and np.memmap's per-slice overhead made reading the 270M model's
    header take 10.5 s. The same mapping viewed as an ndarray reads in 3.1 s (measured), with no
    copy: the view keeps the memmap (and so the mapping) alive.
    """

    @property
    def data(self) -> np.ndarray:
        return self._buffer

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._buffer = value.view(np.ndarray)


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A GGUFReader, cached per file version (reading a header costs seconds, see _Reader)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise ConversionError(f"cannot read the GGUF {path}: {exc.strerror}") from None
    return _open_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    return read_gguf(path)


def read_gguf(path: str | Path) -> gguf.GGUFReader:
    """A fresh (uncached) fast GGUFReader; errors as ConversionError."""
    try:
        return _Reader(path)
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise ConversionError(f"{path} is not a readable GGUF file ({exc})") from None


def field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


@dataclass(frozen=True)
class BaseModel:
    """What conversion needs to know about a base GGUF: its architecture and its tensors."""

    path: Path
    arch: str
    block_count: int
    shapes: dict[str, tuple[int, ...]]  # tensor name -> numpy shape ([n_out, n_in] for weights)

    def check_pair(self, name: str, a: np.ndarray, b: np.ndarray, origin: str) -> None:
        """A [r, n_in] and B [n_out, r] must fit the base weight [n_out, n_in]."""
        if name not in self.shapes:
            raise ConversionError(
                f"{origin} adapts {name}, which the base {self.path.name} does not have (it has "
                f"{self.block_count} blocks, blk.0 .. blk.{self.block_count - 1}); the adapter was "
                "trained for a different model")
        n_out, n_in = self.shapes[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise ConversionError(
                f"{origin}: {name} has lora_a {list(a.shape)} and lora_b {list(b.shape)}; expected lora_a [r, {n_in}] "
                f"and lora_b [{n_out}, r] with the same r >= 1")
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise ConversionError(
                f"{origin}: {name} is [{n_out}, {n_in}] (numpy [n_out, n_in]) in the base "
                f"{self.path.name}, but the adapter has lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)}; expected lora_A [r, {n_in}] and lora_B [{n_out}, r] - the adapter "
                "was trained for a different model")


def read_base(path: str | Path) -> BaseModel:
    """The base's architecture and tensor shapes, from its header alone (milliseconds, no
    tokenizer arrays parsed), after the checks that keep llama.cpp from aborting on it."""
    from ..errors import ModelUnavailable
    from ..gguf_header import check_model, read_header

    try:
        header = read_header(path)
        if header.get("general.type", "model") != "model":
            raise ConversionError(f"{path} is a GGUF {header.get('general.type')}, not a model; pass the base model's .gguf")
        if header.arch not in GEMMA_ARCHS:
            raise ConversionError(f"{path} is a {header.arch!r} model; this converter handles Gemma bases "
                                  f"({', '.join(GEMMA_ARCHS)})")
        check_model(header)
    except ModelUnavailable as exc:  # BadGGUF included
        raise ConversionError(exc.message) from None
    shapes = {t.name: t.shape for t in header.tensors.values()}
    return BaseModel(Path(path), header.arch, int(header.hparam("block_count")), shapes)


def gguf_tensor_name(arch: str, module_path: str, n_blocks: int) -> str | None:
    """HF module path -> GGUF weight name via gguf's own tables, or None if it has none.

    "model.layers.3.self_attn.q_proj" -> "blk.3.attn_q.weight". Multimodal Gemma 3 checkpoints
    nest the text model under "language_model"; like llama.cpp's HF converter, drop that level.
    Returns None for modules llama.cpp cannot apply a LoRA to (embeddings, norms, vision).
    """
    path = module_path.replace("language_model.", "")
    found = _name_map(arch, n_blocks).get_type_and_name(f"{path}.weight", try_suffixes=(".weight",))
    if found is None or found[0] not in _LORA_TENSORS:
        return None
    return found[1]


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(_model_arch(arch), n_blocks)


def _model_arch(arch: str) -> gguf.MODEL_ARCH:
    for key, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return key
    raise ConversionError(f"the installed gguf package does not know the architecture {arch!r}; upgrade gguf")


def write_adapter(path: Path, arch: str, alpha: float, pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Write a llama.cpp LoRA GGUF: one (T.lora_a [r, n_in], T.lora_b [n_out, r]) per base tensor T.

    Tensors stay float32: the adapter is small next to the base (rank 8 on q/v of the 270M is
    1.5 MB), F32 holds f16 and bf16 inputs exactly (bf16's range overflows f16), and the
    scale folded into lora_b (see lora.py) adds no second rounding.
    """
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, a, b in pairs:
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclass(frozen=True)
class GgufAdapter:
    path: Path
    arch: str
    alpha: float
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # base tensor name -> (A [r, n_in], B [n_out, r])

    def delta(self, name: str, scale: float) -> np.ndarray:
        """What llama.cpp adds to base tensor `name` at runtime scale `scale`: [n_out, n_in]."""
        a, b = self.pairs[name]
        rank = a.shape[0]
        # llama.cpp: alpha / rank times the runtime scale; alpha == 0 means "no alpha scaling".
        factor = scale * (self.alpha / rank if self.alpha else 1.0)
        return (b @ a) * np.float32(factor)


def read_adapter(path: str | Path) -> GgufAdapter:
    """Load a GGUF LoRA adapter (ours or llama.cpp's convert_lora_to_gguf's) as float32 pairs."""
    reader = read_gguf(path)  # not cached: adapters are small, and often temporary files
    if field(reader, "general.type") != "adapter" or field(reader, gguf.Keys.Adapter.TYPE) != "lora":
        raise ConversionError(f"{path} is not a GGUF LoRA adapter (general.type={field(reader, 'general.type')!r}, "
                              f"adapter.type={field(reader, gguf.Keys.Adapter.TYPE)!r}; expected 'adapter' and 'lora')")
    tensors = {t.name: t for t in reader.tensors}
    pairs = {}
    for name in tensors:
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        if f"{base}.lora_b" not in tensors:
            raise ConversionError(f"{path} has {name} but no {base}.lora_b")
        a, b = (_as_f32(tensors[f"{base}.lora_{x}"]) for x in "ab")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ConversionError(f"{path}: {base} holds NaN or infinite values; the adapter is corrupt")
        pairs[base] = (a, b)
    alpha = field(reader, gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise ConversionError(f"{path}: adapter.lora.alpha is {alpha!r}; expected a finite number")
    return GgufAdapter(Path(path), field(reader, "general.architecture"), float(alpha), pairs)


def _as_f32(tensor) -> np.ndarray:
    # dequantize returns numpy order ([r, n_in] for lora_a) for F32/F16/Q8_0 alike.
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def check_output_path(out_path: str | Path, *inputs: str | Path) -> Path:
    """Refuse an output that would land in a missing folder or overwrite an input."""
    out = Path(out_path)
    if not out.parent.is_dir():
        raise ConversionError(f"the output folder {out.parent} does not exist; create it first")
    for src in inputs:
        if os.path.exists(src) and out.exists() and os.path.samefile(src, out):
            raise ConversionError(f"the output {out} is one of the inputs; choose another output path")
    return out
