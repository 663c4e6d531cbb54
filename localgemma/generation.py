"""What a generation is made of, below the contract: the request the engine takes, the chunks
it yields, and the decode step both the engine and the batcher run on every sampled token.

    GenerationRequest  tokens, sampling (grammar included), max_tokens, stop tokens, adapters:
                       built whole by runtime.prepare, its invariants checked where it is built
                       (so the engine is safe to call without HTTP)
    Chunk              a piece of text; the last one says why generation ended, with counts
    Decoder            one sequence's decode step: end of generation, budget, UTF-8, stop
                       strings, log probabilities
    Result             what a request produced, whole: the one value every door turns into
                       its wire shape
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from .errors import InvalidInput
from .sampling import SamplingParams


@dataclass(frozen=True)
class AdapterRef:
    """A request's adapter: which GGUF file, at which scale (vLLM's LoRARequest, in small)."""

    path: str
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    tokens: tuple[int, ...]
    sampling: SamplingParams
    max_tokens: int  # what may be generated: already within what the context leaves
    stop_tokens: frozenset[int] = frozenset()  # ends generation like end-of-turn (not shown)
    adapters: tuple[AdapterRef, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one (not shown)
    logprobs: Optional[int] = None  # None: none; k: each token's log probability and its top k

    def __post_init__(self):
        if not self.tokens:
            raise InvalidInput("the prompt has no tokens")
        if not all(isinstance(t, int) and t >= 0 for t in self.tokens):
            raise InvalidInput("the prompt's token ids must be non-negative integers")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidInput(f"max_tokens: {self.max_tokens!r}; at least 1 token must be left to generate")
        for ref in self.adapters:
            if not (math.isfinite(ref.scale) and abs(ref.scale) <= 10):
                raise InvalidInput(f"lora: scale {ref.scale} for {ref.path}; expected a number from -10 to 10")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidInput(f"stop: {list(self.stop)!r}; stop strings must be non-empty")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidInput(f"logprobs: {self.logprobs!r}; expected 0 to {MAX_TOP_LOGPROBS} alternatives")

    @property
    def need(self) -> int:
        """KV cells the request may come to hold: its prompt plus all it may generate."""
        return len(self.tokens) + self.max_tokens


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, bytes and log probability under the model (the raw
    logits, before temperature and penalties), and the `top` most likely alternatives."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of generated text; the last chunk of a generation also says why it ended."""

    text: str
    finish_reason: Optional[str] = None  # "stop" (end of turn, eos, a stop token or string) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # for the tokens whose text this chunk completes


class Decoder:
    """One sequence's decode step. Feed it each sampled token; it says what text to send and
    whether generation is over:

    - an end-of-generation token or a stop token ends it ("stop"); that token is neither shown
      nor counted;
    - reaching max_tokens ends it ("length") after that token's text;
    - text never splits a UTF-8 character: bytes wait until their character is whole, and a
      character left incomplete at the end is dropped (invalid bytes become U+FFFD);
    - with stop strings, the text ends before the first one ("stop"; it is not shown), and a
      tail that could still become one is held back, never sent in a piece of its own;
    - with logprobs, each token's log probability (and top alternatives) travels with the
      text it completes.
    Without stop strings or logprobs, a token costs one lookup and one UTF-8 decode.
    """

    def __init__(self, request: GenerationRequest, piece: Callable[[int], bytes], is_eog: Callable[[int], bool]):
        self.request, self.piece, self.is_eog = request, piece, is_eog
        self.n_gen = 0
        self.last_token = -1  # the token to feed the model next
        self.finish: Optional[str] = None
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""  # text that could still turn out to start a stop string
        self._made = 0  # characters decoded so far
        self._logprobs: list[tuple[int, TokenLogprob]] = []  # (characters made by then, entry), not yet sent
        self.logprobs: tuple[TokenLogprob, ...] = ()  # those that go with the text step() returned

    def step(self, token: int, logits: Optional[Sequence[float]] = None) -> str:
        """The text this token completes ('' if none); sets `finish` when generation ends.
        `logits`: the row the token was sampled from, when the request asks for logprobs."""
        if token in self.request.stop_tokens or self.is_eog(token):
            self.finish = "stop"
            held, self._held = self._held, ""
            return self._send(held, self._made)  # a held tail that never became a stop string
        self.n_gen += 1
        self.last_token = token
        if self.n_gen == self.request.max_tokens:
            self.finish = "length"
        text = self._utf8.decode(self.piece(token))
        self._made += len(text)
        if self.request.logprobs is not None:  # a token that completes no character goes with the next one
            self._logprobs.append((self._made + (0 if text else 1),
                                   _logprob(token, logits, self.request.logprobs, self.piece)))
        if not self.request.stop:
            return self._send(text, self._made)
        text = self._held + text
        before = self._made - len(text)  # characters sent before this text
        hits = [i for i in (text.find(stop) for stop in self.request.stop) if i >= 0]
        if hits:
            self.finish, self._held = "stop", ""
            return self._send(text[:min(hits)], before + min(hits))
        keep = 0 if self.finish else max(
            (n for stop in self.request.stop for n in range(min(len(stop) - 1, len(text)), 0, -1)
             if text.endswith(stop[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return self._send(text[:len(text) - keep], self._made - keep)

    def _send(self, text: str, sent: int) -> str:
        """`text` goes out, `sent` characters in all; with it, the logprobs of the tokens whose
        text is now all out (those of a stop string never go)."""
        if self.request.logprobs is not None:
            self.logprobs = tuple(entry for made, entry in self._logprobs if made <= sent)
            self._logprobs = [(made, entry) for made, entry in self._logprobs if made > sent]
        return text

    def last(self) -> Chunk:
        """The final chunk: why it ended and the token counts."""
        return Chunk("", self.finish or "length", len(self.request.tokens), self.n_gen)


def _logprob(token: int, logits, k: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """log softmax of the row at `token`, and the k most likely tokens."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float64)
    top = row.max()
    norm = top + math.log(float(np.exp(row - top).sum()))
    best = np.argpartition(-row, k)[:k] if k else np.array([], dtype=int)
    best = best[np.argsort(-row[best])]

    def entry(t: int) -> tuple[str, bytes, float]:
        raw = piece(int(t))
        return raw.decode("utf-8", "replace"), raw, float(row[t] - norm)

    text, raw, logprob = entry(token)
    return TokenLogprob(text, raw, logprob, tuple(entry(t) for t in best))


_MISSING = object()  # Result.value when there is no schema


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class Result:
    """What a request produced, whole: the text (JSON text under a schema), the parsed value
    when there is a schema, a tool call when the model made one, why it ended, and usage."""

    text: str
    finish_reason: str  # "stop" | "length" | "tool_calls"
    usage: Usage
    value: Any = _MISSING  # the parsed JSON, with response_format
    tool_calls: tuple[dict, ...] = ()  # [{"name", "arguments": {...}}]
    logprobs: tuple[TokenLogprob, ...] = ()  # every generated token's, when asked for

    @property
    def has_value(self) -> bool:
        return self.value is not _MISSING
