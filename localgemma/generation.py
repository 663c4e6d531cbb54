"""What a generation is made of, below the contract: the request the engine takes, the chunks
it yields, and the decode step both the engine and the batcher run on every sampled token.

    GenerationRequest  tokens, sampling (grammar included), max_tokens, stop tokens, adapters:
                       built whole by runtime.prepare, its invariants checked where it is built
                       (so the engine is safe to call without HTTP)
    Chunk              a piece of text; the last one says why generation ended, with counts
    Decoder            one sequence's decode step: end of generation, budget, UTF-8
    Result             what a request produced, whole: the one value every door turns into
                       its wire shape
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

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

    @property
    def need(self) -> int:
        """KV cells the request may come to hold: its prompt plus all it may generate."""
        return len(self.tokens) + self.max_tokens


@dataclass(frozen=True)
class Chunk:
    """A piece of generated text; the last chunk of a generation also says why it ended."""

    text: str
    finish_reason: Optional[str] = None  # "stop" (end of turn, eos, a stop token) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Decoder:
    """One sequence's decode step. Feed it each sampled token; it says what text to send and
    whether generation is over:

    - an end-of-generation token or a stop token ends it ("stop"); that token is neither shown
      nor counted;
    - reaching max_tokens ends it ("length") after that token's text;
    - text never splits a UTF-8 character: bytes wait until their character is whole, and a
      character left incomplete at the end is dropped (invalid bytes become U+FFFD).
    """

    def __init__(self, request: GenerationRequest, piece: Callable[[int], bytes], is_eog: Callable[[int], bool]):
        self.request, self.piece, self.is_eog = request, piece, is_eog
        self.n_gen = 0
        self.last_token = -1  # the token to feed the model next
        self.finish: Optional[str] = None
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def step(self, token: int) -> str:
        """The text this token completes ('' if none); sets `finish` when generation ends."""
        if token in self.request.stop_tokens or self.is_eog(token):
            self.finish = "stop"
            return ""
        self.n_gen += 1
        self.last_token = token
        if self.n_gen == self.request.max_tokens:
            self.finish = "length"
        return self._utf8.decode(self.piece(token))

    def last(self) -> Chunk:
        """The final chunk: why it ended and the token counts."""
        return Chunk("", self.finish or "length", len(self.request.tokens), self.n_gen)


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

    @property
    def has_value(self) -> bool:
        return self.value is not _MISSING
