"""Grammar-constrained sampling that stays fast on Gemma's 262k-token vocabulary.

llama.cpp's grammar sampler checks every candidate against the grammar; over the whole
vocabulary that is ~2 s per token here (measured: 0.5 tok/s with the grammar first in the
chain). Instead, per token:

    penalties (whole vocabulary) -> the 256 highest logits -> grammar -> the caller's samplers
                                    (none allowed there? the best 4096, 32768, then all)

Greedy decoding is exactly greedy-under-the-grammar: if any allowed token is among the 256
best, the best allowed token is. With temperature, tokens ranked below 256 are not drawn
unless nothing above them is allowed -- a truncation far past any top_k the contract allows
(at most 50), documented in the README.

Accepting a token the grammar forbids makes llama.cpp throw across the C API, which ends the
process. Extreme but valid settings (a temperature of 1e-39, a repetition penalty of 1e-40)
overflow scores to inf and NaN, and a draw over NaN can land anywhere. So scores are kept
finite between the stages, and a draw that lands on a forbidden token is replaced by the best
allowed one: the grammar holds whatever the samplers do.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .bindings import llama_cpp

SHORTLIST = 256
STAGES = (SHORTLIST, 4096, 32768, 1 << 62)  # each a ~10x wider look when the last found nothing
_BIG = np.float32(np.finfo(np.float32).max / 4)  # finite, with headroom for a later division
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class ConstrainedSampler:
    def __init__(self, pre, grammar, post, n_vocab: int):
        # pre: chain of penalties; grammar: the grammar sampler; post: top_k/top_p/temp/dist or greedy
        self.pre, self.grammar, self.post = pre, grammar, post
        self.n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._full = np.zeros(n_vocab, TOKEN_DATA)

    def sample(self, ctx, idx: int = -1) -> int:
        # idx: the batch row of this sequence's logits (-1, the last row, when decoding alone)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        full = self._full
        full["id"], full["logit"], full["p"] = self._ids, logits, 0.0
        self._apply(self.pre, full)  # penalties see the whole vocabulary, as in the plain chain
        _finite(full["logit"])
        for size in STAGES:  # widen only while the grammar allows none of the best `size`
            if size >= self.n_vocab:
                candidates = full
            else:
                top = np.argpartition(full["logit"], -size)[-size:]
                candidates = full[top[np.argsort(full["logit"][top])[::-1]]]
            self._apply(self.grammar, candidates)
            allowed = candidates["logit"] > -np.inf  # the grammar marks what it forbids with -inf
            if allowed.any():
                break
        ids, scores = candidates["id"][allowed], candidates["logit"][allowed]  # copies: `post` reorders
        _finite(candidates["logit"])
        chosen = self._apply(self.post, candidates)
        token = int(candidates["id"][chosen]) if 0 <= chosen < len(candidates) else -1
        if token not in ids:
            token = int(ids[np.argmax(scores)])  # the draw went astray: the best allowed token
        for smpl in (self.pre, self.grammar, self.post):
            llama_cpp.llama_sampler_accept(smpl, token)
        return token

    @staticmethod
    def _apply(smpl, data: np.ndarray) -> int:
        arr = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(data), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        return arr.selected

    def free(self) -> None:
        for smpl in (self.pre, self.grammar, self.post):
            llama_cpp.llama_sampler_free(smpl)


def _finite(logits: np.ndarray) -> None:
    """In place: NaN -> -inf (never drawn), +-inf and huge values -> a finite bound, so the
    next stage's arithmetic (temperature, softmax) stays finite. -inf stays: it means forbidden."""
    np.nan_to_num(logits, copy=False, nan=-np.inf, posinf=_BIG, neginf=-np.inf)
    np.clip(logits, -_BIG, _BIG, out=logits, where=logits > -np.inf)
