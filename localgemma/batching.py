"""Continuous batching: concurrent requests decoded together, one llama_decode per step.

A `Batcher` owns a second llama.cpp context on the engine's model (the engine keeps its own
single-sequence context for exact answers) with up to `parallel` sequences sharing `n_ctx` KV
cells. A background thread runs the loop: between decode steps, cancelled requests leave
(their KV removed at once) and waiting ones join; each step decodes every running sequence's
last token plus as much waiting prompt as fits in n_batch. Each request keeps its own sampler
and reads its own logits row.

llama.cpp applies LoRA adapters per context, so only requests with the same adapter set run
together. When the running set drains, the oldest waiting request of another set picks the
next one (round-robin); a set that has kept another waiting for FAIR_STEPS steps admits nobody
new, so it drains and hands over: no adapter set starves.

Answers in a batch are not bit-identical to solo ones (CPU kernels are not batch-invariant;
tests/test_batching.py measures by how much). Requests that must repeat exactly -- a `seed`,
or `exact=True` -- run on the engine's own context, and the loop pauses meanwhile: on two
cores, two contexts decoding at once would only slow both.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import queue
import threading
from collections import deque
from typing import Iterator, Optional, Sequence

import llama_cpp

from . import sampling
from .adapters import AdapterCache, AdapterRef
from .engine import Chunk, Engine
from .errors import InsufficientMemory, LocalGemmaError

DEFAULT_PARALLEL = 4  # sequences per decode: 2 cores / a Pi gain little beyond this at 270M-2B
DEFAULT_BATCH_CTX = 4096  # KV cells shared by them: 4 requests of ~1k tokens each
FAIR_STEPS = 32  # steps one adapter set may keep admitting while another set waits


def default_parallel() -> int:
    return int(os.environ.get("LOCALGEMMA_PARALLEL", 0)) or DEFAULT_PARALLEL


def default_ctx() -> int:
    return int(os.environ.get("LOCALGEMMA_BATCH_CTX", 0)) or DEFAULT_BATCH_CTX


class _Request:
    """One sequence's state; owned by the loop thread once admitted."""

    def __init__(self, prompt: list[int], budget: int, stop: frozenset, group: tuple, since: int):
        self.prompt, self.budget, self.stop, self.group = prompt, budget, stop, group
        self.since = since  # the step at which it started waiting (fairness)
        self.sampler = None
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = self.done = False
        self.seq = -1
        self.pos = 0  # tokens of this sequence in the KV cache
        self.last = -1  # the sampled token to feed next step
        self.n_gen = 0
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # as Engine._run

    @property
    def need(self) -> int:
        return len(self.prompt) + self.budget  # KV cells it may come to hold


class Batcher:
    def __init__(self, engine: Engine, parallel: Optional[int] = None, n_ctx: Optional[int] = None):
        self.engine = engine
        self.parallel = parallel or default_parallel()
        self._ctx = self._new_context(n_ctx or default_ctx())
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = engine.n_batch
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # Adapter handles belong to the model, activation to a context: a cache of our own keeps
        # the engine's cache (used under the engine's lock) from evicting a handle active here.
        self.adapters = AdapterCache(engine._model)
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}
        self._free = list(range(self.parallel))[::-1]
        self._group: Optional[tuple] = None
        self._exclusive = 0  # exact requests running on the engine: the loop waits
        self._busy = self._closed = False
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="localgemma-batch", daemon=True)
        self._thread.start()

    def _new_context(self, n_ctx: int):
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = self.engine.n_batch
        cparams.n_seq_max = self.parallel
        cparams.kv_unified = True  # one pool of cells: a long request may use what short ones leave
        cparams.n_threads = cparams.n_threads_batch = self.engine.n_threads
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.engine._model, cparams)
        if not ctx:
            raise InsufficientMemory(f"llama.cpp could not create a {n_ctx}-token batch context")
        return ctx

    # -- requests (any thread) --------------------------------------------------------------

    def generate(self, prompt: Sequence[int], params: sampling.SamplingParams, max_tokens: int,
                 stop: frozenset[int] = frozenset(), adapters: tuple[AdapterRef, ...] = (),
                 *, exact: bool = False) -> Iterator[Chunk]:
        """Engine.generate's contract. Batched unless `exact`, seeded, or too big for the pool:
        those run alone on the engine's context (bit-identical to solo, prefix cache included)."""
        budget = min(max_tokens, self.engine.check_fits(len(prompt)))  # raises now, as Engine does
        if exact or params.seed is not None or budget < 1 or len(prompt) + budget > self.n_ctx:
            return self._solo(self.engine.generate(prompt, params, max_tokens, stop, adapters))
        return self._batched(list(prompt), sampling.plan(params), budget, frozenset(stop), tuple(adapters))

    def _solo(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        with self.exclusive():
            yield from chunks

    def _batched(self, prompt, steps, budget, stop, group) -> Iterator[Chunk]:
        req = _Request(prompt, budget, stop, group, self.steps)
        e = self.engine
        req.sampler = sampling.make_sampler(steps, e._vocab, e.n_vocab, self.n_ctx)
        with self._cv:
            self._waiting.append(req)
            self._cv.notify_all()
        try:
            while True:
                item = req.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            with self._cv:  # closed early (client gone): the loop frees its sequence next step
                req.cancelled = True
                self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        """Pause the loop (between steps) while the caller uses the engine's own context."""
        with self._cv:
            self._exclusive += 1
            while self._busy:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._exclusive -= 1
                self._cv.notify_all()

    # -- the loop (its own thread) ----------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (self._exclusive or not (self._running or self._waiting)):
                    self._cv.wait()
                if self._closed:
                    return
                self._reap()
                self._admit()
                self._busy = bool(self._running)
            try:
                if self._running:
                    self._step()
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _reap(self) -> None:
        """Cancelled requests leave now: their KV cells and sequence id are free for the next."""
        for req in [r for r in self._running.values() if r.cancelled]:
            self._leave(req, None)
        for req in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(req)
            self._end(req, None)

    def _admit(self) -> None:
        if not self._running and self._waiting:
            self._switch(self._next_group())
        if self._running and self._starving():
            return  # let the running set drain; another set goes next
        reserved = sum(r.need for r in self._running.values())
        for req in list(self._waiting):
            if not self._free:
                break
            if req.group != self._group:
                continue
            if reserved + req.need > self.n_ctx:
                break  # first come, first served within a set: no small request overtakes
            self._waiting.remove(req)
            req.seq = self._free.pop()
            self._running[req.seq] = req
            reserved += req.need

    def _next_group(self) -> tuple:
        """Round-robin: the oldest waiting request of another set, else the current set."""
        return next((r.group for r in self._waiting if r.group != self._group), self._waiting[0].group)

    def _starving(self) -> bool:
        return any(r.group != self._group and self.steps - r.since > FAIR_STEPS for r in self._waiting)

    def _switch(self, group: tuple) -> None:
        """Make `group` the context's adapter set. Nothing is running, so no KV computed under
        the old set survives (the cache is cleared anyway, for good measure)."""
        if group == self._group:
            return
        llama_cpp.llama_memory_clear(self._mem, True)
        try:
            self.adapters.activate(self._ctx, group)
            self._group = group
        except Exception as exc:  # noqa: BLE001 - an unloadable adapter fails only its own requests
            self._group = None
            for req in [r for r in self._waiting if r.group == group]:
                self._waiting.remove(req)
                self._end(req, exc)

    def _step(self) -> None:
        rows = self._fill()
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        self.steps += 1
        if rc != 0:
            error = LocalGemmaError(f"llama_decode failed with code {rc} (out of context or memory)")
            with self._cv:
                for req in list(self._running.values()):
                    self._leave(req, error)
            return
        for req, idx in rows:
            self._advance(req, idx)

    def _fill(self) -> list[tuple[_Request, int]]:
        """This step's batch: every decoding sequence's last token first (one each), then
        prompt chunks while n_batch has room. Returns (request, logits row) to sample."""
        batch, n, rows = self._batch, 0, []
        running = list(self._running.values())
        for req in running:
            if req.pos >= len(req.prompt):
                n = self._put(batch, n, req, req.last, True)
                rows.append((req, n - 1))
        for req in running:
            while req.pos < len(req.prompt) and n < self.n_batch:
                last = req.pos == len(req.prompt) - 1
                n = self._put(batch, n, req, req.prompt[req.pos], last)
                if last:
                    rows.append((req, n - 1))
        batch.n_tokens = n
        return rows

    @staticmethod
    def _put(batch, n: int, req: _Request, token: int, logits: bool) -> int:
        batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, req.pos, 1
        batch.seq_id[n][0], batch.logits[n] = req.seq, logits
        req.pos += 1
        return n + 1

    def _advance(self, req: _Request, idx: int) -> None:
        """Sample this sequence's next token from its row; stream its text; end it if done."""
        token = req.sampler.sample(self._ctx, idx)
        if token in req.stop or self.engine.is_eog(token):
            return self._finish(req, "stop")
        req.n_gen += 1
        text = req.utf8.decode(self.engine.piece(token))
        if text:
            req.out.put(Chunk(text))
        if req.n_gen == req.budget:
            return self._finish(req, "length")
        req.last = token

    def _finish(self, req: _Request, reason: str) -> None:
        # Bytes still pending are a character cut off by the stop: dropped, as Engine._run does.
        with self._cv:
            self._leave(req, Chunk("", reason, len(req.prompt), req.n_gen))

    def _leave(self, req: _Request, item) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, req.seq, -1, -1)
        del self._running[req.seq]
        self._free.append(req.seq)
        self._end(req, item)

    @staticmethod
    def _end(req: _Request, item) -> None:
        req.done = True
        req.sampler.free()
        if item is not None:
            req.out.put(item)

    # -- measurement ------------------------------------------------------------------------

    def teacher_forced(self, seqs: Sequence[Sequence[int]], start: int) -> list:
        """Per-step logits of sequences decoded together, as generation decodes them: each
        sequence's first `start` tokens prefilled in one shared batch, then one token per
        sequence per step. Returns, per sequence, float32 rows for tokens[start-1:] (row k is
        the distribution after tokens[:start+k]). Only while the batcher is idle."""
        import numpy as np

        with self.exclusive():
            assert not self._running, "teacher_forced needs an idle batcher"
            self._switch(())
            llama_cpp.llama_memory_clear(self._mem, True)
            reqs = [_Request(list(s), 0, frozenset(), (), 0) for s in seqs]
            for i, req in enumerate(reqs):
                req.seq = i
            assert len(seqs) * start <= self.n_batch and len(seqs) <= self.parallel
            out = [[] for _ in seqs]
            steps = max(len(s) for s in seqs) - start + 1
            for k in range(steps):
                n, rows = 0, []
                for i, req in enumerate(reqs):
                    upto = start if k == 0 else start + k
                    while req.pos < min(upto, len(req.prompt)):
                        n = self._put(self._batch, n, req, req.prompt[req.pos], req.pos == upto - 1)
                        if req.pos == upto:
                            rows.append((i, n - 1))
                self._batch.n_tokens = n
                if n == 0:
                    break
                if llama_cpp.llama_decode(self._ctx, self._batch) != 0:
                    raise LocalGemmaError("llama_decode failed")
                for i, idx in rows:
                    row = llama_cpp.llama_get_logits_ith(self._ctx, idx)
                    out[i].append(np.ctypeslib.as_array(row, shape=(self.engine.n_vocab,)).copy())
            llama_cpp.llama_memory_clear(self._mem, True)
        return [np.stack(rows) for rows in out]

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(30)
        for req in list(self._running.values()) + list(self._waiting):
            req.out.put(LocalGemmaError("the model was unloaded"))
        self.adapters.close()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
