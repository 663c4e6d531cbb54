"""`finetune verify`: is the adapter the runtime applies the adapter the user trained?

Reference: the adapter merged into dequantized base weights in numpy (convert.merge_reference
keeps the adapted tensors unquantized as F32, every other tensor byte-identical), run through
llama.cpp.
Runtime: the quantized base with the GGUF adapter switched on through the adapter API.
Both see the same prompts teacher-forced; we report top-1 agreement and KL(reference ‖ runtime)
per position, next to two yardsticks: the noise floor (the bare base against the same base
with the same tensors dequantized, i.e. what the compute path alone changes) and the bare
base against the reference (how far the adapter moves the model at all).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from . import finetunes
from .generation import AdapterRef

CONCLUSIVE = 0.1  # the PEFT floor must be below this share of the adapter's effect to count
PROMPTS = (
    "The capital of France is",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
    "def fibonacci(n):\n    ",
)


@dataclass(frozen=True)
class Agreement:
    top1: float  # share of positions where both pick the same most likely token
    kl_mean: float  # mean KL(reference || other) in nats
    kl_max: float
    positions: int


@dataclass(frozen=True)
class Report:
    finetune: str
    adapter_vs_merged: Agreement  # what should agree: the runtime against the reference
    noise_floor: Agreement  # the same compute-path difference with no adapter at all
    base_vs_merged: Agreement  # how much the adapter changes the model at all
    peft: Optional[str] = None  # how the PEFT comparison went, or why it was skipped
    adapter_vs_peft: Optional[Agreement] = None  # the runtime against PEFT itself (torch)
    peft_noise_floor: Optional[Agreement] = None  # the bare base: llama.cpp against torch

    @property
    def peft_conclusive(self) -> bool:
        """PEFT can only judge the adapter when torch and llama.cpp agree on the bare base far
        better than the adapter moves it. transformers' GGUF loader for Gemma 2/3 ignores
        query_pre_attn_scalar and the logit soft-caps, so there its floor is 0.5-1.2 nats."""
        return self.peft_noise_floor is not None and \
            self.peft_noise_floor.kl_mean <= CONCLUSIVE * self.base_vs_merged.kl_mean

    @property
    def ok(self) -> bool:
        """The runtime is as close to the reference as quantized compute allows, and far closer
        than the bare base is (an adapter applied wrongly, or not at all, fails this).

        Quantized compute differs from the F32 reference twice over: on the base weights (the
        floor) and on the adapter's own path, in proportion to how far the adapter moves the
        model. So the allowance is 4x the floor plus 2% of the adapter's effect. Measured on the
        embedded model (AVX-512 build): 0.031 against 0.007 floor and 2.06 effect (allowance
        0.07); a swapped adapter scores ~2.8, none at all ~2.1."""
        effect = self.base_vs_merged.kl_mean
        checks = [(self.adapter_vs_merged, self.noise_floor)]
        if self.adapter_vs_peft is not None and self.peft_conclusive:
            checks.append((self.adapter_vs_peft, self.peft_noise_floor))
        return all(a.kl_mean <= max(4 * floor.kl_mean + 0.02 * effect, 1e-3) and a.kl_mean <= 0.1 * effect
                   for a, floor in checks)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "peft_conclusive": self.peft_conclusive}


def compare(reference, other) -> Agreement:
    """Both [positions, vocab] logits arrays."""
    import numpy as np

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = float((reference.argmax(-1) == other.argmax(-1)).mean())
    return Agreement(top1=top1, kl_mean=float(kl.mean()), kl_max=float(kl.max()), positions=len(kl))


def verify(name_or_id: str, model: Optional[str] = None, prompts: Sequence[str] = PROMPTS) -> Report:
    import numpy as np

    from .models import resolve
    from .runtime import get_engine

    entry = finetunes.get(name_or_id, finetunes.normalize_model(model) if model else None)
    if entry.status != "ready":
        raise finetunes.FinetuneIncomplete(f"finetune {entry.name!r} has no converted adapter yet")
    engine = get_engine(entry.model)
    ids = [engine.tokenize(p, special=True, add_bos=True) for p in prompts]
    adapter = (AdapterRef(str(entry.adapter_path)),)
    runtime = np.concatenate([engine.logits(t, adapter) for t in ids])
    base = np.concatenate([engine.logits(t) for t in ids])
    # The reference is built from the PEFT files the user gave, not from our GGUF conversion.
    source = [(entry.files_dir, 1.0)]
    with tempfile.TemporaryDirectory() as tmp:
        merged = _reference_logits(resolve(entry.model), source, Path(tmp) / "merged.gguf", ids, engine.n_threads)
        floor = _reference_logits(resolve(entry.model), [(entry.files_dir, 0.0)], Path(tmp) / "floor.gguf", ids,
                                  engine.n_threads)
    note, peft_adapted, peft_base = _peft_logits(resolve(entry.model), entry.files_dir, ids)
    report = Report(finetune=entry.name, adapter_vs_merged=compare(merged, runtime),
                    noise_floor=compare(floor, base), base_vs_merged=compare(merged, base), peft=note,
                    adapter_vs_peft=compare(peft_adapted, runtime) if peft_adapted is not None else None,
                    peft_noise_floor=compare(peft_base, base) if peft_base is not None else None)
    if report.peft_noise_floor is not None and not report.peft_conclusive:
        report = replace(report, peft=(
            f"inconclusive: without any adapter, llama.cpp and transformers already differ by KL "
            f"{report.peft_noise_floor.kl_mean:.3f}, not well below the adapter's own effect "
            f"({report.base_vs_merged.kl_mean:.3f}); transformers' GGUF loader for Gemma 2/3 ignores "
            "query_pre_attn_scalar and the soft-caps. The numpy-merge comparison above decides."))
    return report


def _reference_logits(base_path, adapters, out: Path, ids, threads):
    """Logits of the base with `adapters` folded into F32 copies of the tensors they touch.
    At scale 0 that is the base itself, computed the reference's way: the noise floor."""
    import numpy as np

    from .convert import merge_reference
    from .engine import Engine

    merge_reference(base_path, adapters, out)
    engine = Engine(out, n_ctx=max(len(t) for t in ids) + 16, n_threads=threads, probe=False)  # made here
    try:
        return np.concatenate([engine.logits(t) for t in ids])
    finally:
        engine.close()
        out.unlink()


def _peft_logits(base_gguf: Path, folder: Path, ids):
    """(note, adapted, base): PEFT's own logits for the prompts, from transformers' F32
    dequantization of the same GGUF -- when torch, transformers and peft are installed
    (`pip install 'localgemma[verify]'`)."""
    try:
        import numpy as np
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        return "skipped: install torch, transformers and peft (pip install 'localgemma[verify]')", None, None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_gguf.parent), gguf_file=base_gguf.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # transformers' GGUF loader covers some architectures only
        return f"skipped: transformers cannot load {base_gguf.name} ({type(exc).__name__}: {exc})", None, None

    def logits(m):
        with torch.no_grad():
            return np.concatenate([m(torch.tensor([t])).logits[0].float().numpy() for t in ids])

    base = logits(model)
    with warnings.catch_warnings():  # peft notes our extra "model_type" key (Cloudflare's) as unknown
        warnings.simplefilter("ignore")
        adapted = logits(PeftModel.from_pretrained(model, str(folder)))
    return "compared against PEFT (transformers, F32 weights dequantized from the GGUF)", adapted, base
