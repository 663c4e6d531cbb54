"""PEFT LoRA folder -> GGUF LoRA adapter that llama.cpp loads next to a quantized base."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConversionError
from ..files import atomic_output, sha256
from .gguf_lora import BaseModel, check_output_path, gguf_tensor_name, read_base, write_adapter
from .peft import LoraModule, read_peft_adapter


@dataclass(frozen=True)
class AdapterInfo:
    rank: int  # the largest rank in the adapter (rank_pattern may give some modules less)
    alpha: float  # adapter.lora.alpha as written (see _file_alpha)
    targets: tuple[str, ...]  # sorted module short names, e.g. ("q_proj", "v_proj")
    n_tensors: int  # GGUF tensors written: a lora_a and a lora_b per adapted weight
    layers: tuple[int, ...]  # sorted block indices that carry at least one adapted weight
    architecture: str  # general.architecture, copied from the base
    out_path: Path
    sha256: str
    skipped: tuple[str, ...] = ()  # vision-tower modules left out: they never act on text

    def notes(self) -> list[str]:
        """What a person should know about the conversion beyond its success."""
        if not self.skipped:
            return []
        kinds = sorted({m.rsplit(".", 1)[-1] for m in self.skipped})
        return [f"left out {len(self.skipped)} vision-tower modules ({', '.join(kinds)}; e.g. {self.skipped[0]}): "
                "they adapt the image encoder, which never runs on text-only requests"]


def peft_to_gguf(adapter_dir: str | Path, base_gguf: str | Path, out_path: str | Path, *,
                 max_rank: Optional[int] = None, max_bytes: Optional[int] = None) -> AdapterInfo:
    """Convert a PEFT LoRA folder for `base_gguf` into a GGUF adapter at `out_path`.

    Raises ConversionError (and writes nothing) for anything llama.cpp could not apply exactly.
    The limits default to the settings' max_lora_rank and max_lora_mb.
    """
    from ..settings import current

    settings = current()
    max_rank = settings.max_lora_rank if max_rank is None else max_rank
    max_bytes = settings.max_lora_bytes if max_bytes is None else max_bytes
    out = check_output_path(out_path, base_gguf)
    adapter = read_peft_adapter(adapter_dir, max_rank=max_rank, max_bytes=max_bytes)
    base = read_base(base_gguf)
    named = _gguf_names(adapter.modules, base, origin=str(adapter.folder))
    alpha = _file_alpha(adapter.modules)
    pairs = [(name, m.a, _fold_scale(m, alpha)) for name, m in named]
    for name, _, b in pairs:
        if not np.isfinite(b).all():
            raise ConversionError(f"{adapter.folder}: {name}'s lora_B overflows float32 once PEFT's scale is folded "
                                  "in; check lora_alpha / alpha_pattern")
    with atomic_output(out) as tmp:
        write_adapter(tmp, base.arch, alpha, pairs)
        digest = sha256(tmp)
    return AdapterInfo(
        rank=max(m.rank for m in adapter.modules),
        alpha=alpha,
        targets=tuple(sorted({m.target for m in adapter.modules})),
        n_tensors=2 * len(pairs),
        layers=tuple(sorted({int(name.split(".")[1]) for name, _ in named})),
        architecture=base.arch,
        out_path=out,
        sha256=digest,
        skipped=adapter.skipped,
    )


def _gguf_names(modules: tuple[LoraModule, ...], base: BaseModel, origin: str) -> list[tuple[str, LoraModule]]:
    """Each module's GGUF weight name, checked against the base's shapes, in the base's order."""
    layers = [int(m) for mod in modules for m in re.findall(r"\.layers\.(\d+)\.", mod.path)]
    n_blocks = max([base.block_count, *(n + 1 for n in layers)])
    if n_blocks > base.block_count + 64:  # naming that many blocks would take minutes, to refuse anyway
        raise ConversionError(f"{origin} adapts layer {n_blocks - 1}, but the base {base.path.name} has "
                              f"{base.block_count} blocks (blk.0 .. blk.{base.block_count - 1}); the adapter was "
                              "trained for a different model")
    named = []
    for module in modules:
        name = gguf_tensor_name(base.arch, module.path, n_blocks)
        if name is None:
            raise ConversionError(f"{origin} adapts {module.path}, which has no tensor in a {base.arch} "
                                  "GGUF (only the text decoder's attention and MLP projections can be adapted)")
        base.check_pair(name, module.a, module.b, origin)
        named.append((name, module))
    order = {name: i for i, name in enumerate(base.shapes)}
    return sorted(named, key=lambda pair: order[pair[0]])


def _file_alpha(modules: tuple[LoraModule, ...]) -> float:
    """The one adapter.lora.alpha for the file.

    llama.cpp scales every tensor pair by alpha / r_tensor with a single alpha per file, while
    PEFT scales module m by s_m (alpha_m / r_m, or alpha_m / sqrt(r_m) with rsLoRA, alpha_m and
    r_m from alpha_pattern / rank_pattern). The alpha llama.cpp would need for m is s_m * r_m.
    Write the most common one, so a plain adapter is stored unchanged, and fold the rest into B.
    """
    counts = Counter(m.scale * m.rank for m in modules)
    return counts.most_common(1)[0][0]


def _fold_scale(module: LoraModule, alpha: float) -> np.ndarray:
    """B [n_out, r] scaled so that llama.cpp's (alpha / r) * B' A equals PEFT's s_m * B A."""
    ratio = module.scale * module.rank / alpha
    return module.b if ratio == 1.0 else module.b * np.float32(ratio)
