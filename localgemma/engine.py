"""The engine: one GGUF loaded once through llama.cpp's C API, generating typed chunks.

Nothing here knows about the contract, templates, HTTP or terminals: it takes a
`GenerationRequest` and yields `Chunk`s. One context per model; a lock serialises requests.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

from . import preload, sampling, system, weights
from .adapters import AdapterCache
from .bindings import llama_cpp
from .errors import ContextOverflow, InsufficientMemory, InvalidInput, LocalGemmaError
from .generation import AdapterRef, Chunk, Decoder, GenerationRequest
from .memory import pad_ctx
from .settings import current as settings

log = logging.getLogger("localgemma")

DEFAULT_N_CTX = 8192
DEFAULT_N_BATCH = 512
# llama.cpp's KV cache types (`--kv-type`): ggml type ids. Quantized caches need flash
# attention, which llama.cpp turns on by itself on the CPU ("auto").
KV_GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}


class Engine:
    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: Optional[int] = None,
        n_threads: Optional[int] = None,
        n_batch: int = DEFAULT_N_BATCH,
        probe: bool = True,
        kv_type: str = "f16",
    ):
        """`probe`: see weights.load. Weights a preload has read (localgemma.preload) are
        taken instead of loaded again."""
        self.path = Path(path)
        self._model = self._ctx = None
        if kv_type not in KV_GGML_TYPES:
            raise InvalidInput(f"kv_type: {kv_type!r} is not a KV cache type; use one of {', '.join(KV_GGML_TYPES)}")
        self.kv_type = kv_type
        self.n_threads = n_threads or system.physical_cores()
        self._lock = threading.Lock()
        pending = preload.take(self.path)  # read silently: a preload runs only when LOCALGEMMA_VERBOSE is unset
        self._model = (pending.result() if pending is not None
                       else weights.load(self.path, verbose=settings().verbose, probe=probe))
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
        n_ctx = pad_ctx(n_ctx or min(self.n_ctx_train, DEFAULT_N_CTX))

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        self.set_kv_type(cparams)
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise InsufficientMemory(f"llama.cpp could not create a {n_ctx}-token context for {self.path.name}")
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)  # at most n_ctx: 256 for a 256-token context
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._pieces: dict[int, bytes] = {}
        self._one = (llama_cpp.llama_token * 1)()
        self.adapters = AdapterCache(self._model)
        # Prompt tokens whose KV is in the cache *and* was computed as whole n_batch slices
        # aligned at position 0 -- the only KV a later prompt may reuse (see _prefill).
        self._kv_slices: list[int] = []
        self.reused_tokens = 0  # of the last prompt (tests and bench read it)

    def set_kv_type(self, cparams) -> None:
        cparams.type_k = cparams.type_v = KV_GGML_TYPES[self.kv_type]

    # -- tokens -----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Text -> ids. `special=False` keeps '<start_of_turn>' typed by a user as plain text."""
        data = text.encode()
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:  # cannot happen with cap >= bytes + specials, but never trust a buffer size
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, -n, add_bos, special)
        return list(buf[:n])

    def control_token(self, text: str) -> int:
        """The id of a control string such as '<start_of_turn>' (it must be one token)."""
        ids = self.tokenize(text, special=True)
        if len(ids) != 1:
            raise LocalGemmaError(f"{self.path.name} has no single token for {text!r} (got {ids}); is it a Gemma model?")
        return ids[0]

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:  # a buffer per miss: the batch thread and request threads both call this
            buf = ctypes.create_string_buffer(256)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            cached = buf.raw[: max(n, 0)]
            self._pieces[token] = cached
        return cached

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode(errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- generation -------------------------------------------------------------------------

    def check_fits(self, n_prompt: int) -> int:
        """Tokens left for generation after the prompt; ContextOverflow when none are."""
        if n_prompt >= self.n_ctx:
            raise ContextOverflow(
                f"the prompt is {n_prompt} tokens but the context holds {self.n_ctx} "
                f"(prompt plus at least one generated token); shorten the prompt"
            )
        return self.n_ctx - n_prompt

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        """Yield text chunks, then a final chunk with the finish reason and token counts (see
        generation.Decoder). The request's adapters are the LoRA set to apply; switching the set
        drops every cached prompt slice, so nothing computed under one adapter set is reused
        under another."""
        if request.max_tokens > self.check_fits(len(request.tokens)):  # raises now, not at first next()
            raise ContextOverflow(f"max_tokens: {request.max_tokens} do not fit after a {len(request.tokens)}-token "
                                  f"prompt in a {self.n_ctx}-token context")
        return self._generate(request)

    def _generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        with self._lock:
            if self.adapters.activate(self._ctx, request.adapters):
                self._kv_slices = []  # KV computed under another adapter set is wrong now
            sampler = sampling.make_sampler(request.sampling, self._vocab, self.n_vocab, self.n_ctx)
            try:
                yield from self._run(request, sampler)
            finally:
                sampler.free()

    def _run(self, request: GenerationRequest, sampler) -> Iterator[Chunk]:
        ctx, one, sample = self._ctx, self._one, sampler.sample
        self._prefill(request.tokens)
        decoder = Decoder(request, self.piece, self.is_eog)
        want_logprobs = request.logprobs is not None
        while True:
            token = sample(ctx)
            text = decoder.step(token, self.logits_row(ctx, -1) if want_logprobs else None)
            if text or decoder.logprobs:
                yield Chunk(text, logprobs=decoder.logprobs)
            if decoder.finish:
                break
            one[0] = decoder.last_token
            self._decode(llama_cpp.llama_batch_get_one(one, 1))
        yield decoder.last()

    def logits_row(self, ctx, idx: int):
        """The logits a context computed for batch row `idx` (-1: the last), as a numpy view."""
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))

    def logits(self, tokens: Sequence[int], adapters: tuple[AdapterRef, ...] = ()):
        """Teacher-forced logits at every position: float32 array [len(tokens), n_vocab].
        Row i is the distribution over the token after tokens[:i+1]."""
        import numpy as np

        self.check_fits(len(tokens))
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        with self._lock:
            self.adapters.activate(self._ctx, tuple(adapters))
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), False)
            self._kv_slices = []
            batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
            try:
                for start in range(0, len(tokens), self.n_batch):
                    part = tokens[start:start + self.n_batch]
                    batch.n_tokens = len(part)
                    for i, tok in enumerate(part):
                        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + i, 1
                        batch.seq_id[i][0], batch.logits[i] = 0, True
                    self._decode(batch)
                    for i in range(len(part)):
                        row = llama_cpp.llama_get_logits_ith(self._ctx, i)
                        out[start + i] = np.ctypeslib.as_array(row, shape=(self.n_vocab,))
            finally:
                llama_cpp.llama_batch_free(batch)
        return out

    def _prefill(self, prompt: Sequence[int]) -> None:
        """Evaluate the prompt in fixed n_batch slices aligned at position 0, reusing the KV of
        whole slices the previous prompt shared.

        llama.cpp's CPU kernels are not batch-invariant: a prefix evaluated as part of a longer
        batch, or token by token during generation, gives slightly different KV than the same
        prefix evaluated in a batch of another shape, which can flip a near-tie greedy pick.
        Evaluating every prompt in the same aligned slices makes each slice's KV a function of
        its tokens alone, so reusing whole identical slices is bit-exact: a request answers the
        same whether its prefix was cached or not (tests/test_prefix_cache.py checks this).
        """
        mem = llama_cpp.llama_get_memory(self._ctx)
        shared = 0
        for a, b in zip(self._kv_slices, prompt[: len(prompt) - 1]):  # the last token is always run
            if a != b:
                break
            shared += 1
        reuse = shared - shared % self.n_batch
        if reuse == 0 or not llama_cpp.llama_memory_seq_rm(mem, 0, reuse, -1):
            # The cells only (as llama.cpp's own server does): a free cell is masked out of
            # attention whatever it holds, and wiping the data too (memset of the whole cache:
            # 16 ms at 8192 tokens) cost every request that much time to first token.
            llama_cpp.llama_memory_clear(mem, False)
            reuse = 0
        self.reused_tokens = reuse
        ids = (llama_cpp.llama_token * len(prompt))(*prompt)
        for start in range(reuse, len(prompt), self.n_batch):
            n = min(self.n_batch, len(prompt) - start)
            ptr = ctypes.cast(ctypes.addressof(ids) + start * ctypes.sizeof(llama_cpp.llama_token),
                              ctypes.POINTER(llama_cpp.llama_token))
            self._kv_slices = list(prompt[:start])  # if this decode fails, only this much is sound
            self._decode(llama_cpp.llama_batch_get_one(ptr, n))
        self._kv_slices = list(prompt[: len(prompt) - len(prompt) % self.n_batch])

    def _decode(self, batch) -> None:
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise LocalGemmaError(f"llama_decode failed with code {rc} (out of context or memory)")

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "adapters", None) is not None:
            self.adapters.close()
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self, _finalizing=sys.is_finalizing):  # bound now: at exit, module globals may be None
        if _finalizing():
            # The interpreter is exiting and the OS takes the memory back as the process
            # ends; llama.cpp's own free of the weights would only delay the exit (~60 ms for
            # the embedded model, which plain llama-cpp-python pays on every exit).
            return
        try:
            self.close()
        except Exception:
            pass
