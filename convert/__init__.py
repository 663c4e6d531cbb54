"""PEFT LoRA -> GGUF conversion, merge and quantize (installed as `localgemma.convert`).

Pure functions; every refusal is a `localgemma.errors.ConversionError` naming what was wrong
and what would be right, and nothing is written when one is raised. `cli.py` is the thin door.

    peft_to_gguf(adapter_dir, base_gguf, out_path, *, max_rank=None, max_bytes=None) -> AdapterInfo
    merge(base_gguf, [(adapter, scale), ...], out_path, *, out_type=None, progress=None) -> MergeInfo
    quantize(in_path, out_path, type) -> Path
"""

from .llama_quant import QUANT_TYPES, quantize
from .lora import AdapterInfo, peft_to_gguf
from .merge import MergeInfo, merge, merge_reference
from .peft import GEMMA_MODEL_TYPES, SUPPORTED_TARGETS

__all__ = [
    "AdapterInfo", "GEMMA_MODEL_TYPES", "MergeInfo", "QUANT_TYPES", "SUPPORTED_TARGETS",
    "merge", "merge_reference", "peft_to_gguf", "quantize",
]
