"""Build PEFT LoRA folders the way `peft`'s save_pretrained writes them, without torch.

    make_peft_adapter(folder, base_gguf, targets=("q_proj", "v_proj"), rank=8, alpha=16)

writes `adapter_config.json` + `adapter_model.safetensors` for a Gemma GGUF base, with every
dimension read from the base. Unlike PEFT's initialisation (B = 0, so a fresh adapter does
nothing) B is random too, so the adapter visibly changes the model's output.

Independent of the converter's logic (its own tiny name table, its own safetensors writer,
PEFT's scale rule restated), so tests that use it check the converter against a second
implementation; only the GGUF header read is shared, for speed.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

# HF module -> (submodule path inside a decoder layer, GGUF tensor kind)
_MODULES = {
    "q_proj": ("self_attn", "attn_q"), "k_proj": ("self_attn", "attn_k"),
    "v_proj": ("self_attn", "attn_v"), "o_proj": ("self_attn", "attn_output"),
    "gate_proj": ("mlp", "ffn_gate"), "up_proj": ("mlp", "ffn_up"), "down_proj": ("mlp", "ffn_down"),
}
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def make_peft_adapter(
    folder: str | Path,
    base_gguf: str | Path,
    *,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    rank: int = 8,
    alpha: float = 16,
    layers: Optional[Iterable[int]] = None,
    dtype: str = "float32",
    seed: int = 0,
    scale_b: float = 0.05,
    rank_pattern: Optional[dict] = None,
    alpha_pattern: Optional[dict] = None,
    use_rslora: bool = False,
    extra_config: Optional[dict] = None,
) -> Path:
    """Write a PEFT LoRA folder for `base_gguf` into `folder` (created) and return `folder`.

    A ~ U(-1/sqrt(n_in), 1/sqrt(n_in)) (PEFT's kaiming init); B ~ N(0, scale_b), so with the
    defaults the update is ~20% of the attention weights' size: a clear but sane change.
    `layers` restricts the adapter to those blocks (and sets layers_to_transform).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = tuple(targets)
    n_layers, dims = base_dims(base_gguf)
    layer_list = sorted(layers) if layers is not None else list(range(n_layers))
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layer_list:
        for target in targets:
            sub, kind = _MODULES[target]
            module = f"model.layers.{layer}.{sub}.{target}"
            r = int(peft_pattern_value(rank_pattern, module, rank))
            n_out, n_in = dims[kind]
            bound = 1 / math.sqrt(n_in)
            tensors[f"base_model.model.{module}.lora_A.weight"] = rng.uniform(-bound, bound, (r, n_in))
            tensors[f"base_model.model.{module}.lora_B.weight"] = rng.normal(0, scale_b, (n_out, r))
    write_safetensors(folder / "adapter_model.safetensors", tensors, dtype)
    config = _config(base_gguf, targets, rank, alpha, layers, rank_pattern, alpha_pattern, use_rslora)
    config.update(extra_config or {})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def _config(base_gguf, targets, rank, alpha, layers, rank_pattern, alpha_pattern, use_rslora) -> dict:
    """The keys peft 0.13+ writes for a LoraConfig, plus the "model_type" Workers AI asks for."""
    return {
        "alpha_pattern": alpha_pattern or {},
        "auto_mapping": None,
        "base_model_name_or_path": "google/gemma-3-270m",
        "bias": "none",
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": sorted(layers) if layers is not None else None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.05,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "model_type": "gemma3",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": rank_pattern or {},
        "revision": None,
        "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": use_rslora,
    }


def peft_pattern_value(pattern: Optional[dict], module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: first key matching the module path's end."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def peft_scale(config: dict, module: str, rank: int) -> float:
    """The multiplier PEFT applies to B @ A for `module` (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    alpha = peft_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


@functools.lru_cache(maxsize=4)
def base_dims(base_gguf: str | Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(block count, {"attn_q": (n_out, n_in), ...}) read from the base GGUF's blk.0 tensors."""
    # The converter's cached GGUFReader: a plain GGUFReader takes ~10 s on Gemma's tokenizer.
    from localgemma.convert.gguf_lora import open_gguf

    reader = open_gguf(base_gguf)
    arch = reader.get_field("general.architecture").contents()
    n_layers = int(reader.get_field(f"{arch}.block_count").contents())
    dims = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.0\.(\w+)\.weight", t.name)
        if m and len(t.shape) == 2:
            n_in, n_out = (int(d) for d in t.shape)  # GGUFReader gives ggml order [n_in, n_out]
            dims[m[1]] = (n_out, n_in)
    return n_layers, dims


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """The safetensors layout: u64 header length, JSON header (space-padded to 8 bytes), data."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        data = _encode(np.asarray(tensors[name], dtype=np.float32), dtype)
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(chunks))


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _encode(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        return to_bf16_bits(values).astype("<u2").tobytes()
    return values.astype("<f4" if dtype == "float32" else "<f2").tobytes()


def write_gguf_adapter(path: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float = 8.0) -> Path:
    """A llama.cpp LoRA GGUF written directly ({base tensor: (lora_a, lora_b)}), bypassing the
    converter: for adapters the converter would never make (foreign shapes, mismatched ranks)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, (a, b) in pairs.items():
        writer.add_tensor(f"{name}.lora_a", np.asarray(a, np.float32))
        writer.add_tensor(f"{name}.lora_b", np.asarray(b, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
