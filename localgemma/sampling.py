"""Sampling: the engine's parameters, the one translation from the contract, and the
llama.cpp sampler chain built from them.

The chain is planned as data first (`plan`), so the mapping is unit-testable without a
model, then realised (`make_sampler`). Two common chains read the logits row in numpy rather
than through `llama_sampler_sample`, which fills and (for top_p and dist) sorts a candidate
array of the whole 262k-entry vocabulary on every token: plain greedy (`GreedySampler`, the
same token) and, without a seed, top_k/top_p/temperature/draw (`DrawSampler`, the same
distribution). Everything else -- seeds, penalties, grammars -- is llama.cpp's native chain.
llama-cpp-python's own defaults (top_k 40, min_p 0.05, top_p 0.95,
repeat_penalty 1.1 over the last 64 tokens) are not used: a field the caller leaves out
truncates or penalises nothing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from .errors import InvalidInput

U32 = 0xFFFFFFFF
# Penalties look back over every token generated so far (prompt tokens do not count: they
# are never `accept`ed into the chain). -1 means "the whole context"; `build` turns it into
# the context size, because llama.cpp's sampler clamps a negative window to 0 (= off).
PENALTY_WINDOW = -1
# Below these, float32 arithmetic breaks: logits divided by a temperature of 1e-39 (or a
# repetition penalty of 1e-40) overflow to inf, and a draw over inf/NaN scores is garbage.
# A temperature this small is greedy in the limit, so it is greedy; a penalty this small
# acts as the smallest one that stays finite.
GREEDY_BELOW = 1e-6
MIN_PENALTY = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    temperature: float  # no default here: the contract has it (0.6)
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None  # the contract's seed, 1..9999999999
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    grammar: Optional[str] = None  # GBNF, root rule "root"

    def __post_init__(self):
        """The engine's own invariants (the contract's bounds are stricter): finite numbers,
        nothing negative that would divide or truncate by it."""
        for name in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise InvalidInput(f"{name}: {value!r}; expected a finite number")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if (getattr(self, name) or 0) < 0:
                raise InvalidInput(f"{name}: {getattr(self, name)}; expected a number of at least 0")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise InvalidInput(f"top_k: {self.top_k!r}; expected a whole number of at least 1")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise InvalidInput(f"seed: {self.seed!r}; expected a whole number of at least 0")

    @classmethod
    def from_inputs(cls, inputs, grammar: Optional[str] = None) -> "SamplingParams":
        """The one translation from wire fields to engine parameters."""
        return cls(
            temperature=inputs.temperature,
            top_p=inputs.top_p,
            top_k=inputs.top_k,
            seed=inputs.seed,
            repetition_penalty=inputs.repetition_penalty,
            frequency_penalty=inputs.frequency_penalty,
            presence_penalty=inputs.presence_penalty,
            grammar=grammar,
        )


def llama_seed(seed: Optional[int]) -> int:
    """Contract seed (up to 9999999999, wider than 32 bits) -> llama.cpp's uint32 seed.

    Seeds below 2**32-1 pass through unchanged, so `seed: 42` here equals `--seed 42` in
    llama.cpp. Larger seeds are mixed (splitmix64) down to 32 bits: deterministic, and spread
    rather than wrapped, so 2**32+1 does not collide with 1. No seed -> a fresh random one.
    0xFFFFFFFF is llama.cpp's "pick randomly" sentinel, so it is never returned.
    """
    if seed is None:
        return int.from_bytes(os.urandom(4), "little") % U32
    if seed < U32:
        return seed
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) & U32) % U32


def plan(params: SamplingParams) -> list[tuple]:
    """The sampler chain as data: [(name, *args)], in the order llama.cpp applies them."""
    steps: list[tuple] = []
    if params.grammar is not None:
        steps.append(("grammar", params.grammar))
    repeat = params.repetition_penalty
    repeat = 1.0 if repeat in (None, 0) else max(repeat, MIN_PENALTY)  # 0 would divide logits by zero: off
    freq = params.frequency_penalty or 0.0
    present = params.presence_penalty or 0.0
    if repeat != 1.0 or freq or present:
        steps.append(("penalties", PENALTY_WINDOW, repeat, freq, present))
    if params.temperature < GREEDY_BELOW:
        steps.append(("greedy",))
        return steps
    if params.top_k is not None:
        steps.append(("top_k", params.top_k))
    if params.top_p is not None and params.top_p < 1:
        steps.append(("top_p", params.top_p, 1))
    steps.append(("temp", params.temperature))
    steps.append(("dist", llama_seed(params.seed)))
    return steps


class ChainSampler:
    """The plain path: llama.cpp samples natively, no Python per token beyond one call."""

    def __init__(self, chain):
        from .bindings import llama_cpp

        self.chain = chain
        self._sample, self._free = llama_cpp.llama_sampler_sample, llama_cpp.llama_sampler_free

    def sample(self, ctx, idx: int = -1) -> int:
        """`idx`: the batch row holding this sequence's logits (-1: the last one, single-sequence)."""
        return self._sample(self.chain, ctx, idx)

    def free(self) -> None:
        self._free(self.chain)


class _RowSampler:
    """A sampler that reads the sequence's logits row itself, as float32 numpy (no copy)."""

    def __init__(self, n_vocab: int):
        import ctypes

        from .bindings import llama_cpp

        self._row_type = ctypes.POINTER(ctypes.c_float * n_vocab)
        self._logits, self._cast = llama_cpp.llama_get_logits_ith, ctypes.cast

    def row(self, ctx, idx: int):
        import numpy as np

        row = self._logits(ctx, idx)
        if not row:
            raise RuntimeError(f"llama.cpp has no logits for batch row {idx}")
        return np.frombuffer(self._cast(row, self._row_type).contents, np.float32)

    def free(self) -> None:
        pass


class GreedySampler(_RowSampler):
    """Greedy with nothing before it: the first highest logit, read straight from the row.

    The same token as llama.cpp's greedy sampler (which also keeps the first of equal
    maxima), without what `llama_sampler_sample` does first on every call: allocate and fill
    a candidate array the size of the vocabulary (~0.7 ms per token on Gemma's 262k entries,
    more under load; numpy's argmax over the row takes ~0.03 ms)."""

    def sample(self, ctx, idx: int = -1) -> int:
        return int(self.row(ctx, idx).argmax())


class DrawSampler(_RowSampler):
    """top_k -> top_p -> temperature -> a draw, for requests without a seed: the distribution
    llama.cpp's chain of those samplers draws from, computed in numpy from the logits row.

    llama.cpp's top_p and dist sort the whole candidate array (std::sort of 262k entries,
    ~2.3 ms per token here, and the contract's default -- temperature 0.6, nothing else --
    paid it on every token). Here nothing is sorted but the few candidates top_k or top_p
    keep, and the draw walks block sums, not a 262k-entry running sum. A seeded request keeps
    llama.cpp's own chain: its seed then draws what llama.cpp's would."""

    def __init__(self, n_vocab: int, temperature: float, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, rng=None):
        import numpy as np

        super().__init__(n_vocab)
        self.n_vocab, self.temperature = n_vocab, temperature
        self.top_k = top_k if top_k is not None and top_k < n_vocab else None
        self.top_p = top_p if top_p is not None and top_p < 1 else None
        self._rng = rng if rng is not None else np.random.default_rng()

    def distribution(self, row):
        """(token ids or None for all, unnormalised weights) for a float32 logits row."""
        import numpy as np

        ids = None
        logits = row
        if self.top_k is not None:  # the k best (their order does not matter yet)
            ids = np.argpartition(logits, len(logits) - self.top_k)[len(logits) - self.top_k:]
            logits = logits[ids]
        if self.top_p is not None:
            keep = _nucleus(logits, self.top_p)
            ids = keep if ids is None else ids[keep]
            logits = logits[keep]
        weights = logits - logits.max()
        weights *= np.float32(1.0 / self.temperature)
        return ids, np.exp(weights, out=weights)

    def probabilities(self, row):
        """(token ids, probabilities): what `sample` draws from, for tests."""
        import numpy as np

        ids, weights = self.distribution(np.asarray(row, dtype=np.float32))
        return (np.arange(len(weights)) if ids is None else ids), weights / weights.sum(dtype=np.float64)

    def sample(self, ctx, idx: int = -1) -> int:
        ids, weights = self.distribution(self.row(ctx, idx))
        pick = _draw(weights, self._rng.random())
        return pick if ids is None else int(ids[pick])


def _nucleus(logits, p: float):
    """Indices of llama.cpp's top_p set: by descending logit, up to and including the first
    token where the softmax's running sum reaches p (at least one token). Only tokens of
    weight >= (1 - p) * total / n can be in it (those below hold less than 1 - p of the mass
    together), so only those are sorted."""
    import numpy as np

    weights = np.exp(logits - logits.max())
    total = float(weights.sum(dtype=np.float64))
    cand = np.flatnonzero(weights >= (1.0 - p) * total / len(weights))
    order = cand[np.argsort(-logits[cand])]
    mass = np.cumsum(weights[order], dtype=np.float64) / total
    hit = int(np.searchsorted(mass, p, side="left"))  # the first index whose running sum is >= p
    return order[:hit + 1]


DRAW_BLOCK = 512


def _draw(weights, u: float) -> int:
    """Index i with probability weights[i] / sum, for u uniform in [0, 1): the block holding
    u * sum by the blocks' sums, then the entry inside it."""
    import numpy as np

    n = len(weights)
    if n <= DRAW_BLOCK:
        blocks, size = np.array([weights.sum(dtype=np.float64)]), n
    else:
        size = DRAW_BLOCK
        whole = n - n % size
        blocks = weights[:whole].reshape(-1, size).sum(axis=1, dtype=np.float64)
        if whole < n:
            blocks = np.append(blocks, weights[whole:].sum(dtype=np.float64))
    ends = np.cumsum(blocks)
    target = u * ends[-1]
    b = min(int(np.searchsorted(ends, target, side="right")), len(ends) - 1)
    inside = np.cumsum(weights[b * size:(b + 1) * size], dtype=np.float64)
    i = min(int(np.searchsorted(inside, target - (ends[b - 1] if b else 0.0), side="right")), len(inside) - 1)
    while i > 0 and inside[i] == inside[i - 1]:  # clamped past the block's last token of weight: back to it
        i -= 1
    return b * size + i


def make_sampler(params: SamplingParams, vocab, n_vocab: int, n_ctx: int):
    """The sampler for these parameters, ready to `sample(ctx, row)`; `free()` it after."""
    steps = plan(params)
    if params.seed is None and steps[-1][0] == "dist" and {s[0] for s in steps} <= {"top_k", "top_p", "temp", "dist"}:
        return DrawSampler(n_vocab, params.temperature, params.top_k, params.top_p)  # no seed: numpy's draw
    return realise(steps, vocab, n_vocab, n_ctx)


def realise(steps: list[tuple], vocab, n_vocab: int, n_ctx: int):
    """A plan as samplers: a native chain, or (with a grammar) the constrained sampler."""
    if steps and steps[0][0] == "grammar":
        from .constrained import ConstrainedSampler

        grammar = _init("grammar", steps[0][1:], vocab, n_vocab, n_ctx)
        pre = _chain([s for s in steps[1:] if s[0] == "penalties"], vocab, n_vocab, n_ctx)
        post = _chain([s for s in steps[1:] if s[0] != "penalties"], vocab, n_vocab, n_ctx)
        return ConstrainedSampler(pre, grammar, post, n_vocab)
    if steps == [("greedy",)]:
        return GreedySampler(n_vocab)
    return ChainSampler(_chain(steps, vocab, n_vocab, n_ctx))


def _chain(steps: list[tuple], vocab, n_vocab: int, n_ctx: int):
    from .bindings import llama_cpp

    chain_params = llama_cpp.llama_sampler_chain_default_params()
    chain_params.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(chain_params)
    for name, *args in steps:
        llama_cpp.llama_sampler_chain_add(chain, _init(name, args, vocab, n_vocab, n_ctx))
    return chain


def _init(name: str, args, vocab, n_vocab: int, n_ctx: int):
    from .bindings import llama_cpp

    if name == "grammar":
        smpl = llama_cpp.llama_sampler_init_grammar(vocab, args[0].encode(), b"root")
        if not smpl:
            raise InvalidInput("response_format: llama.cpp's grammar parser refused the grammar made from this "
                               "schema (too many repetitions combined?); simplify the schema")
        return smpl
    if name == "penalties":
        window, *strengths = args
        window = n_ctx if window == PENALTY_WINDOW else window
        return llama_cpp.llama_sampler_init_penalties(n_vocab, window, *strengths)
    return getattr(llama_cpp, f"llama_sampler_init_{name}")(*args)
