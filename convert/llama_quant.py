"""GGUF quantization through llama.cpp's own quantizer (gguf-py's numpy code has no K-quants).

The C call, through llama_cpp's ctypes bindings:

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.tt_overrides = <array of llama_model_tensor_override{pattern, ggml type}, NULL-ended>
    llama_cpp.llama_model_quantize(b"in.gguf", b"out.gguf", ctypes.byref(params))  # 0 = success

llama.cpp copies a tensor byte for byte when the type it picks equals the tensor's current
type; otherwise it dequantizes it to f32 (only with allow_requantize) and quantizes again.
"""

from __future__ import annotations

import ctypes
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ConversionError
from ..files import atomic_output

# Output types offered to users: llama.cpp's file types that need no importance matrix
# (IQ1/IQ2/IQ3_XXS and Q2_K_S do) and are meant for ordinary dense models (TQ*, MXFP4 are not).
QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
    "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS",
)


def ftype_of(type_name: str) -> int:
    """"Q4_K_M" -> llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M (case-insensitive)."""
    from localgemma.bindings import llama_cpp

    name = type_name.upper()
    if name not in QUANT_TYPES:
        raise ConversionError(f"unknown quantization type {type_name!r}; choose one of {', '.join(QUANT_TYPES)}")
    return getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}")


def ftype_name(ftype: int) -> str | None:
    """The QUANT_TYPES name of a llama.cpp file type (a GGUF's general.file_type), if offered."""
    for name in QUANT_TYPES:
        if ftype_of(name) == ftype:
            return name
    return None


def quantize(in_path: str | Path, out_path: str | Path, type: str) -> Path:
    """Quantize (or requantize) a GGUF model to `type` with llama.cpp's quantizer.

    Requantizing an already-quantized model works but compounds the rounding of both steps;
    start from an F16/BF16/F32 GGUF when you have one.
    """
    ftype = ftype_of(type)
    src = Path(in_path)
    if not src.is_file():
        raise ConversionError(f"no GGUF file at {src}")
    from .gguf_lora import check_output_path  # gguf and numpy: only when quantizing

    out = check_output_path(out_path, src)
    with atomic_output(out) as tmp:
        run_quantizer(src, tmp, ftype, allow_requantize=True)
    return out


def run_quantizer(src: Path, dst: Path, ftype: int, *, pins: dict[str, int] | None = None,
                  allow_requantize: bool = False) -> None:
    """One llama_model_quantize call; `pins` maps exact tensor names to ggml types.

    Pins only take effect when ftype is a quantized type (llama.cpp ignores overrides for
    F16/BF16/F32 outputs, where every weight simply becomes that type).
    """
    from localgemma.bindings import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = allow_requantize
    keep_alive = None
    if pins:
        keep_alive = _tensor_overrides(pins)
        params.tt_overrides = ctypes.cast(keep_alive, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    llama_cpp.llama_backend_init()
    with _captured_llama_log() as errors:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep_alive
    if rc != 0:
        detail = "; ".join(line.strip() for line in errors[-2:]) or f"return code {rc}"
        raise ConversionError(f"llama.cpp could not quantize {src.name}: {detail}")


def _tensor_overrides(pins: dict[str, int]):
    """A NULL-terminated C array of {regex, ggml type}; ^...$ so each pin hits one tensor."""
    from localgemma.bindings import llama_cpp

    overrides = (llama_cpp.llama_model_tensor_override * (len(pins) + 1))()
    for slot, (name, ggml_type) in zip(overrides, pins.items()):
        slot.pattern = f"^{re.escape(name)}$".encode()
        slot.type = int(ggml_type)
    overrides[len(pins)].pattern = None  # the terminator llama.cpp stops at
    return overrides


@contextmanager
def _captured_llama_log() -> Iterator[list[str]]:
    """Route llama.cpp's log to a list while quantizing: a library must not print, and its error
    lines become the ConversionError's message. Whatever handler was installed is restored."""
    from localgemma.bindings import llama_cpp

    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5)
            errors.append(text.decode("utf-8", errors="replace"))

    previous, previous_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(previous, previous_data)
