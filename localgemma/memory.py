"""Will it fit? Memory for a model, estimated from its header before llama.cpp loads anything.

    weights   the tensors' bytes (memory-mapped: every page is touched while decoding)
    KV cache  per context: cells x layers x KV heads x (key + value length) x the cache type's
              bytes per value (f16 2, q8_0 34/32, q4_0 18/32). llama.cpp pads cells to 256 and,
              in this build, gives Gemma 3's sliding-window layers full-size caches too.
    compute   per context: the logits of its sequences (n_vocab x 4 bytes each), the
              activations of one n_ubatch-token step, ping-ponged: n_ubatch x 4 x (2 n_ff +
              4 n_embd) x 2, and its attention masks (f16, n_ubatch x the cells in use; two
              with sliding-window layers), as large as the context once it is full.
              llama.cpp *reserves* more (a worst case of n_ubatch x n_vocab floats: 514 MiB
              for Gemma 3's 262k vocabulary), but never touches most of it for generation,
              where only the last token's logits are computed.
    runtime   Python, llama.cpp and the server: 120 MiB.

Calibrated on the embedded Gemma 3 270M (peak resident memory, `localgemma run` of a prompt
that fills the context): 2048 cells 415 MiB measured / 422 estimated; 8192: 537 / 542; 32768:
1026 / 1022; a server at its defaults with both contexts filled: 662 / 656.
The Gemma 2B/7B rows of the catalog carry their shapes, so `localgemma info` answers "will the
7B fit on my Pi?" before a 5 GB download.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .errors import InsufficientMemory, InvalidInput

MiB = 2**20
KV_TYPES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # bytes per cached value
N_UBATCH = 512  # the engine's n_batch (= n_ubatch)
RUNTIME_BYTES = 120 * MiB
PAD = 256  # llama.cpp rounds a context's cells up to this
MIN_CTX = 256
DEFAULT_CTX = 8192


@dataclass(frozen=True)
class Shape:
    """What memory depends on, from a GGUF header (or the catalog, for a model not here yet)."""

    n_layer: int
    n_head_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    n_embd: int
    n_ff: int
    n_vocab: int
    weights: int  # bytes
    n_ctx_train: int
    swa: bool = False  # sliding-window layers (Gemma 3): a second KV cache, and a second attention mask

    def kv_per_cell(self, kv_type: str) -> float:
        return sum(self.n_head_kv) * (self.key_length + self.value_length) * KV_TYPES[kv_type]

    def mask_per_cell(self, n_ubatch: int = N_UBATCH) -> int:
        """Attention masks (f16) over a context's cells, for one n_ubatch-token step: two with
        sliding-window layers."""
        return n_ubatch * 2 * (2 if self.swa else 1)


@dataclass(frozen=True)
class Context:
    n_ctx: int
    n_seq: int = 1  # sequence ids: llama.cpp keeps a logits row (n_vocab floats) for each


MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: sequence ids a context may have


def cached_sequences(parallel: int) -> int:
    """Finished sequences a batch context for `parallel` requests keeps as its prefix cache
    (batching.py), each under a sequence id of its own: as many as run, within MAX_SEQ."""
    return max(0, min(parallel, MAX_SEQ - parallel))


def batch_context(n_ctx: int, parallel: int) -> Context:
    """The batcher's context: `n_ctx` cells, the running sequences' ids and the cached ones'."""
    return Context(n_ctx, parallel + cached_sequences(parallel))


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv: int
    compute: int
    runtime: int
    kv_type: str
    contexts: tuple[Context, ...]

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.runtime

    def describe(self) -> str:
        cells = " + ".join(f"{c.n_ctx}" for c in self.contexts)
        return (f"{self.total / MiB:,.0f} MiB ({self.weights / MiB:,.0f} weights + {self.kv / MiB:,.0f} KV cache for "
                f"{cells} tokens in {self.kv_type} + {self.compute / MiB:,.0f} compute + {self.runtime / MiB:,.0f} runtime)")

    def to_dict(self) -> dict:
        return {"total_mib": round(self.total / MiB), "weights_mib": round(self.weights / MiB),
                "kv_mib": round(self.kv / MiB), "compute_mib": round(self.compute / MiB),
                "kv_type": self.kv_type, "contexts": [c.n_ctx for c in self.contexts]}


def shape_of(path: str | Path) -> Shape:
    """The model's shape from its header (milliseconds; no array is parsed). A header whose
    numbers llama.cpp would crash on is refused first (BadGGUF names the number): an estimate
    from `block_count 100000` would only blame memory for a broken file."""
    from .gguf_header import ArrayRef, check_model, read_array, read_header, tensor_nbytes

    header = check_model(read_header(path))
    n_layer = int(header.hparam("block_count") or 0)
    n_head = header.hparam("attention.head_count") or 1
    head_kv = header.hparam("attention.head_count_kv", n_head)
    if isinstance(head_kv, ArrayRef):
        head_kv = read_array(header, f"{header.arch}.attention.head_count_kv")
    per_layer = tuple(int(h) for h in head_kv) if isinstance(head_kv, list) else (int(head_kv),) * n_layer
    n_embd = int(header.hparam("embedding_length") or 0)
    first_head = n_head if isinstance(n_head, int) else 1
    head_dim = n_embd // max(first_head, 1)
    n_ff = header.hparam("feed_forward_length") or 0
    if isinstance(n_ff, ArrayRef):
        n_ff = max(read_array(header, f"{header.arch}.feed_forward_length"))
    tokens = header.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, ArrayRef) else 0
    weights = 0
    for t in header.tensors.values():
        try:
            weights += tensor_nbytes(t)
        except ValueError:
            pass  # an unknown type: check_model refuses the file elsewhere
    return Shape(n_layer=n_layer, n_head_kv=per_layer,
                 key_length=int(header.hparam("attention.key_length") or head_dim),
                 value_length=int(header.hparam("attention.value_length") or head_dim),
                 n_embd=n_embd, n_ff=int(n_ff), n_vocab=n_vocab, weights=weights,
                 n_ctx_train=int(header.hparam("context_length") or 0),
                 swa=bool(header.hparam("attention.sliding_window")))


def estimate(shape: Shape, contexts: Sequence[Context], kv_type: str = "f16", n_ubatch: int = N_UBATCH) -> Estimate:
    contexts = tuple(Context(pad_ctx(c.n_ctx), c.n_seq) for c in contexts)
    kv = sum(c.n_ctx for c in contexts) * shape.kv_per_cell(kv_type)
    step = n_ubatch * 4 * (2 * shape.n_ff + 4 * shape.n_embd) * 2
    # masks: a row per step token over the cells in use, all of them at worst
    compute = sum(c.n_seq * shape.n_vocab * 4 + step + c.n_ctx * shape.mask_per_cell(n_ubatch) for c in contexts)
    return Estimate(shape.weights, math.ceil(kv), compute, RUNTIME_BYTES, kv_type, contexts)


def pad_ctx(n_ctx: int) -> int:
    """A context's cells as llama.cpp gives them: n_ctx rounded up to a multiple of 256. The
    engine asks for them so, since llama.cpp caps n_batch at the n_ctx *asked* for (300 -> a
    512-cell context that takes 300-token batches; a 512-token slice then aborts the process)."""
    return -(-n_ctx // PAD) * PAD


def largest_context(shape: Shape, budget: int, kv_type: str, others: Sequence[Context] = (), n_seq: int = 1,
                    growing: int = 1) -> int:
    """The most cells (a multiple of 256, at most the model's training context) the first
    context -- with `n_seq` sequence ids -- can have within `budget` bytes, `others` included;
    0 when not even 256 fit. `growing`: how many contexts take that many cells (2: the context
    and a batch context of the same size, the batch one the last of `others`)."""
    fixed = estimate(shape, [Context(0, n_seq), *others], kv_type).total
    per_cell = growing * (shape.kv_per_cell(kv_type) + shape.mask_per_cell())
    cells = int((budget - fixed) // per_cell) // PAD * PAD if budget > fixed else 0
    if shape.n_ctx_train >= MIN_CTX:
        cells = min(cells, shape.n_ctx_train // PAD * PAD)
    return cells if cells >= MIN_CTX else 0


def fit(path: str | Path, *, n_ctx: Optional[int], default_ctx: Optional[int], kv_type: str = "f16",
        batch: Optional[Context] = None, available: Optional[int] = None,
        shape: Optional[Shape] = None) -> tuple[int, Optional[str]]:
    """The context to load `path` with, and a note when it is not the one asked for.

    `n_ctx` given: at most the model's training context (else InvalidInput), and it must fit,
    or InsufficientMemory names the numbers and what would fit -- each way out checked.
    `n_ctx` None: `default_ctx` (None: the model's training context, at most 8192) when it
    fits, else the largest context that does (the note says so). `batch`: the batch context a
    server adds (its cells stay as set; a smaller --batch-ctx or --exact are offered). `shape`:
    known already (else read from the header)."""
    from . import system

    shape = shape or shape_of(path)
    name = Path(path).name
    train = shape.n_ctx_train
    if n_ctx and train and n_ctx > train:
        raise InvalidInput(f"--n-ctx / LOCALGEMMA_N_CTX: {n_ctx} is more than the {train} tokens {name} was trained "
                           f"on (a longer context gives it positions it has never seen); use {train} or less")
    want = n_ctx or default_ctx or min(train or DEFAULT_CTX, DEFAULT_CTX)
    if not n_ctx and train:
        want = min(want, train)
    if not train or pad_ctx(want) <= train:
        want = pad_ctx(want)  # what llama.cpp gives, said as such
    available = system.available_memory() if available is None else available
    if available is None:  # the OS will not say: trust the user
        return want, None
    others = [batch] if batch else []
    need = estimate(shape, [Context(want), *others], kv_type)
    if need.total <= available:
        return want, None
    largest = largest_context(shape, available, kv_type, others)
    smaller_kv = [t for t in KV_TYPES if KV_TYPES[t] < KV_TYPES[kv_type]]
    beside = f" beside a batch context of {pad_ctx(batch.n_ctx)} tokens" if batch else ""
    if n_ctx is None and largest:
        more = [*[f"--kv-type {t}" for t in smaller_kv[:1]], *["a smaller --batch-ctx"][:bool(batch)]]
        return largest, (f"{name}: a context of {want} tokens{beside} would need {need.describe()}, and "
                         f"{available / MiB:,.0f} MiB is available: using {largest} tokens (--n-ctx / "
                         f"LOCALGEMMA_N_CTX sets it{'; more fits with ' + ' or '.join(more) if more else ''})")

    def fits(contexts: Sequence[Context], kv: str) -> Optional[str]:
        """With the context as asked (n_ctx given) or shrunk as far as it must (not given):
        None when nothing fits, else what the context then is."""
        if n_ctx is not None:
            return f"the {want} tokens fit" if estimate(shape, [Context(want), *contexts], kv).total <= available \
                else None
        cells = min(want, largest_context(shape, available, kv, contexts))
        return f"a context of {cells} tokens" if cells else None

    options = []
    if largest:
        options.append(f"a context of {largest} tokens (--n-ctx {largest})")
    for other in smaller_kv:
        if (result := fits(others, other)) is not None:
            options.append(f"--kv-type {other} ({result})")
    if batch:
        # Asked for: the context stays, the batch context takes what is left. Not asked for: the
        # two as large as each other, so the context need not shrink below the batch context.
        cells = (largest_context(shape, available, kv_type, [Context(want)], n_seq=batch.n_seq) if n_ctx is not None
                 else largest_context(shape, available, kv_type, [Context(0, batch.n_seq)], growing=2))
        cells = min(cells, pad_ctx(batch.n_ctx) - PAD)
        if cells >= MIN_CTX:
            options.append(f"a smaller batch context (--batch-ctx {cells})")
        if (result := fits([], kv_type)) is not None:
            options.append(f"no batch context (--exact: one request at a time; {result})")
    way_out = ("; what would fit: " + "; or ".join(options)) if options else \
        ("; nothing would: even its weights and a context of 256 tokens need more. Free memory, or use a smaller "
         "model or quantization")
    raise InsufficientMemory(f"{name} with a context of {want} tokens{beside} needs {need.describe()}, but only "
                             f"{available / MiB:,.0f} MiB of memory is available{way_out}")
