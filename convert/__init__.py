"""PEFT LoRA -> GGUF conversion, merge and quantize (installed as `localgemma.convert`).

Pure functions; every refusal is a `localgemma.errors.ConversionError` naming what was wrong
and what would be right, and nothing is written when one is raised. `cli.py` is the thin door.

    peft_to_gguf(adapter_dir, base_gguf, out_path, *, max_rank=None, max_bytes=None) -> AdapterInfo
    check_one(path)         one file of a PEFT folder, judged alone (an upload brings one at a time)
    merge(base_gguf, [(adapter, scale), ...], out_path, *, out_type=None, progress=None) -> MergeInfo
    quantize(in_path, out_path, type) -> Path

The names below are imported on first use, so the CLI (which attaches `convert`) does not
load gguf and numpy for `localgemma run`.
"""

from ..lazy import names as _names

_HOMES = {
    "QUANT_TYPES": "llama_quant", "quantize": "llama_quant",
    "AdapterInfo": "lora", "peft_to_gguf": "lora",
    "MergeInfo": "merging", "merge": "merging", "merge_reference": "merging",
    "GEMMA_MODEL_TYPES": "peft", "SUPPORTED_TARGETS": "peft", "check_one": "peft",
}
__all__ = list(_HOMES)
__getattr__ = _names(__name__, _HOMES)
