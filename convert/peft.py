"""Read a PEFT LoRA folder (what `peft`'s `save_pretrained` writes, what Workers AI accepts).

A folder holds exactly `adapter_config.json` and `adapter_model.safetensors`. Keys look like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, with

    lora_A.weight: [r, n_in]    (the down projection)
    lora_B.weight: [n_out, r]   (the up projection)

and PEFT computes y = W x + scale * B (A x), where scale = alpha / r, or alpha / sqrt(r) with
rsLoRA. `rank_pattern` / `alpha_pattern` give some modules their own r / alpha; everything
here resolves those to one `scale` per module, so later steps need no PEFT knowledge.
Everything a llama.cpp adapter cannot express is refused here, by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex

from ..errors import ConversionError
from ..jsontext import strict_json
from .safetensors_io import SafetensorsFile, read_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")
# The linear layers of a Gemma decoder block: the only places llama.cpp applies a text LoRA.
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Multimodal Gemma 3 checkpoints hold an image encoder next to the text model; an adapter
# trained with target_modules="all-linear" adapts it too. It only ever acts on image input.
VISION_PARTS = ("vision_tower", "vision_model", "multi_modal_projector")
VISION_ONLY_TARGETS = ("out_proj", "fc1", "fc2")  # SigLIP's names; Gemma's text model has none of them
# PEFT's own scale (alpha / r, or alpha / sqrt(r)) beyond this would blow activations up to inf.
MAX_SCALE = 1e4
# rank_pattern / alpha_pattern keys are regular expressions: each match gets this long.
PATTERN_SECONDS = 0.1

# base_model.model.<module>.lora_A.weight; older PEFT versions kept the adapter name
# (".default") in the key. Embedding LoRAs use lora_embedding_A/B; DoRA adds a magnitude vector.
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.default)?(?:\.weight)?$"
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: A [r, n_in], B [n_out, r], and PEFT's multiplier for B·A."""

    path: str  # module path inside the model, e.g. "model.layers.3.self_attn.q_proj"
    a: np.ndarray
    b: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def target(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class PeftAdapter:
    folder: Path
    config: dict
    modules: tuple[LoraModule, ...]
    skipped: tuple[str, ...] = ()  # vision-tower modules left out (never used on text)


def read_peft_adapter(folder: str | Path, *, max_rank: int, max_bytes: int) -> PeftAdapter:
    """Validate a PEFT folder and load its LoRA matrices as float32, one scale per module."""
    folder = Path(folder)
    config_path, weights_path = _find_files(folder)
    size = weights_path.stat().st_size
    if size > max_bytes:
        raise ConversionError(f"{weights_path} is {size / 2**20:.1f} MiB; the limit is "
                              f"{max_bytes / 2**20:.0f} MiB (lower the rank or the number of target modules)")
    config = _read_config(config_path)
    _check_config(config, config_path)
    weights = read_safetensors(weights_path)
    pairs, skipped = _pair_keys(weights, weights_path)
    modules = tuple(_load_module(weights, path, keys, config) for path, keys in sorted(pairs.items()))
    if not modules:
        raise ConversionError(f"{weights_path} holds no LoRA matrices for the text model (keys ending in "
                              "lora_A.weight / lora_B.weight); is it a LoRA adapter saved by peft?")
    _check_rank(modules, max_rank, weights_path)
    return PeftAdapter(folder, config, modules, tuple(sorted(skipped)))


def check_one(path: Path) -> None:
    """One file of a PEFT folder on its own, as far as it can be judged without the other: the
    config's every setting, the weights' header (an upload that brings one file at a time)."""
    if path.name == CONFIG_NAME:
        _check_config(_read_config(path), path)
    else:
        read_safetensors(path)


def _find_files(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder; pass the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ConversionError(f"{folder} has no {CONFIG_NAME} (found: {found}); a PEFT adapter folder "
                              f"holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if weights_path.is_file():
        return config_path, weights_path
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise ConversionError(f"{folder} has {', '.join(others)} but no {WEIGHTS_NAME}; "
                              f"the weights file must be named {WEIGHTS_NAME} (rename it)")
    if (folder / "adapter_model.bin").exists():
        raise ConversionError(f"{folder} has adapter_model.bin (a PyTorch pickle) instead of {WEIGHTS_NAME}; "
                              "re-save the adapter with save_pretrained(..., safe_serialization=True)")
    raise ConversionError(f"{folder} has no {WEIGHTS_NAME}; a PEFT adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")


def _read_config(path: Path) -> dict:
    try:
        config = strict_json(path.read_text(encoding="utf-8"), constants=True)  # NaN: refused by name below
    except ValueError as exc:  # not UTF-8, or not JSON
        raise ConversionError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object, found a {type(config).__name__}")
    return config


def _check_config(config: dict, path: Path) -> None:
    """Refuse, by name, every setting a llama.cpp LoRA adapter cannot express."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ConversionError(f'{path} has no "model_type"; add "model_type": "gemma" to it '
                              "(Workers AI asks for the same)")
    if model_type not in GEMMA_MODEL_TYPES:
        raise ConversionError(f'{path} says "model_type": {_show(model_type)}; these models are Gemma: '
                              f'use "model_type": "gemma" (accepted: {", ".join(GEMMA_MODEL_TYPES)})')
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ConversionError(f'{path} says "peft_type": {_show(peft_type)}; only LoRA adapters ("LORA") can be converted')
    if config.get("use_dora"):
        raise ConversionError(f'{path} says "use_dora": true; DoRA has no llama.cpp equivalent: '
                              "train a plain LoRA (use_dora=false) or merge the DoRA weights into the base with peft")
    if config.get("modules_to_save"):
        raise ConversionError(f'{path} lists "modules_to_save": {_show(config["modules_to_save"])}; llama.cpp adapters '
                              "hold only LoRA matrices, not fully trained modules: train without modules_to_save")
    if config.get("bias", "none") != "none":
        raise ConversionError(f'{path} says "bias": {_show(config["bias"])}; llama.cpp adapters cannot carry '
                              'trained biases: train with bias="none"')
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ConversionError(f'{path}: "target_modules" is {_show(targets)}; expected a list of module names '
                              '(e.g. ["q_proj", "v_proj"]), a regular expression or "all-linear"')
    if isinstance(targets, list):
        bad = sorted({str(t) for t in targets} - set(SUPPORTED_TARGETS) - set(VISION_ONLY_TARGETS))
        if bad:
            raise ConversionError(_unsupported_message(bad, f"{path} targets"))
    _positive_int(config.get("r"), f"{path}: 'r'")
    _positive_number(config.get("lora_alpha"), f"{path}: 'lora_alpha'")
    for key, check in (("rank_pattern", _positive_int), ("alpha_pattern", _positive_number)):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise ConversionError(f"{path}: {key!r} is {_show(pattern)}; expected an object mapping module "
                                  "names (or patterns) to values")
        for name, value in pattern.items():
            check(value, f"{path}: {key}[{name!r}]")
            try:
                regex.compile(name)
            except regex.error as exc:
                raise ConversionError(f"{path}: {key} key {name!r} is not a valid regular expression ({exc}); "
                                      "use a module name such as 'q_proj' or 'layers.3.self_attn.q_proj'") from None


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1 \
            or value != int(value):
        raise ConversionError(f"{where} is {_show(value)}; expected a whole number of at least 1 (a LoRA rank)")
    return int(value)


def _positive_number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 \
            or value > 1e30:
        raise ConversionError(f"{where} is {_show(value)}; expected a positive finite number (LoRA alpha, e.g. 16)")
    return float(value)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unsupported_message(names: list[str], prefix: str) -> str:
    return (f"{prefix} {', '.join(names)}, which llama.cpp cannot apply a LoRA to (embeddings, lm_head "
            f"and norms are out); retrain with target_modules among {', '.join(SUPPORTED_TARGETS)}")


def _pair_keys(weights: SafetensorsFile, path: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """(module path -> {"A": key, "B": key}, vision modules left out), refusing every key that is
    not a plain LoRA matrix of the text model's projections."""
    pairs: dict[str, dict[str, str]] = {}
    unsupported, vision = set(), set()
    for key in weights.entries:
        m = _KEY.match(key)
        if m is None:
            raise ConversionError(f"{path} holds {key!r}, which is not a LoRA matrix (lora_A / lora_B); "
                                  "adapters with modules_to_save or trained biases cannot be converted")
        part, module = m["part"], m["module"]
        if part == "lora_magnitude_vector":
            raise ConversionError(f"{path} holds DoRA magnitudes ({key}); DoRA has no llama.cpp equivalent: "
                                  "train a plain LoRA (use_dora=false)")
        if any(p in module.split(".") for p in VISION_PARTS):
            vision.add(module)
            continue
        if part.startswith("lora_embedding") or module.rsplit(".", 1)[-1] not in SUPPORTED_TARGETS:
            unsupported.add(module.rsplit(".", 1)[-1])
            continue
        pairs.setdefault(module, {})[part[-1]] = key
    if unsupported:
        raise ConversionError(_unsupported_message(sorted(unsupported), f"{path} adapts"))
    for module, keys in pairs.items():
        if set(keys) != {"A", "B"}:
            missing = "lora_B" if "A" in keys else "lora_A"
            raise ConversionError(f"{path} has no {missing} for {module}; every adapted module needs both")
    return pairs, sorted(vision)


def _load_module(weights: SafetensorsFile, path: str, keys: dict[str, str], config: dict) -> LoraModule:
    where = f"{weights.path}: {path}"
    for part in "AB":
        shape = weights.entries[keys[part]].shape
        if len(shape) != 2 or 0 in shape:
            raise ConversionError(f"{where} has lora_{part} of shape {list(shape)}; expected a 2-D matrix "
                                  f"({'[r, n_in]' if part == 'A' else '[n_out, r]'}) with no empty dimension")
    a, b = weights.load(keys["A"]), weights.load(keys["B"])
    if a.shape[0] != b.shape[1]:
        raise ConversionError(f"{where} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; expected "
                              "lora_A [r, n_in] and lora_B [n_out, r] with the same r")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConversionError(f"{where} holds NaN or infinite values; the adapter is corrupt or its training diverged")
    rank = _pattern_value(config, "rank_pattern", path, config["r"], weights.path)
    if int(rank) != a.shape[0]:
        raise ConversionError(f"{where} has rank {a.shape[0]} (lora_A {list(a.shape)}) but adapter_config.json "
                              f"says r={rank} for it (r / rank_pattern); the config does not match the weights")
    alpha = float(_pattern_value(config, "alpha_pattern", path, config["lora_alpha"], weights.path))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if scale > MAX_SCALE:
        raise ConversionError(f"{where}: alpha {alpha:g} over rank {rank} gives PEFT scale {scale:g}; above "
                              f"{MAX_SCALE:g} it would overflow the model's activations (check lora_alpha / alpha_pattern in "
                              "adapter_config.json)")
    return LoraModule(path, a, b, scale)


def _pattern_value(config: dict, key: str, module_path: str, default, origin: Path):
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the end of the
    module path at a '.' boundary wins ("q_proj", "layers.3.self_attn.q_proj", a regex).
    Keys come from the user's file: each match runs with a time limit (and without holding the
    GIL), so a pattern that backtracks catastrophically is refused instead of freezing us."""
    for name, value in (config.get(key) or {}).items():
        try:
            if regex.match(rf"(.*\.)?({name})$", module_path, timeout=PATTERN_SECONDS):
                return value
        except TimeoutError:
            raise ConversionError(f"{origin}: {key} key {name!r} takes too long to match module names (the "
                                  "pattern backtracks catastrophically); use a plain module name such as "
                                  "'q_proj' or 'layers.3.self_attn.q_proj'") from None
    return default


def _check_rank(modules: tuple[LoraModule, ...], max_rank: int, path: Path) -> None:
    worst = max(modules, key=lambda m: m.rank)
    if worst.rank > max_rank:
        raise ConversionError(f"{path} has rank {worst.rank} ({worst.path}); the limit is {max_rank} "
                              "(retrain with a smaller r, or raise max_rank)")
