"""Continuous batching: concurrent requests decoded together, one llama_decode per step.

A `Batcher` owns a second llama.cpp context on the engine's model (the engine keeps its own
single-sequence context for exact answers) with up to `parallel` sequences sharing `n_ctx` KV
cells. A background thread runs the loop: between decode steps, cancelled requests leave
(their KV removed at once) and waiting ones join; each step decodes every running sequence's
last token plus prompt tokens, first come first (`BatchPolicy.prefill`). Each request keeps
its own sampler and reads its own logits row; the decode step is generation.Decoder, as on
the engine. A request's chunks go to its `emit` once the step's rows are all sampled: to a
queue its caller's thread reads (`generate`), or straight to an event loop (`submit`).
Finished sequences' KV stays behind as a prefix cache (`BatchPolicy.keep_tokens`), which a
request whose prompt starts the same way (a chat's next turn) shares instead of prefilling.

Who runs, and when, is `BatchPolicy`'s: a pure object (no llama.cpp), tested on its own.
llama.cpp applies LoRA adapters per context, so only requests with the same adapter set run
together. When the running set drains, the oldest waiting request of another set picks the
next one (round-robin); a set that has kept another waiting for FAIR_STEPS steps admits nobody
new, so it drains and hands over: no adapter set starves.

Answers in a batch are not bit-identical to solo ones (CPU kernels are not batch-invariant;
tests/test_batching.py measures by how much). Requests that must repeat exactly -- a `seed`,
or one too big for the pool -- run on the engine's own context, and the loop pauses
meanwhile: on two cores, two contexts decoding at once would only slow both.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import OrderedDict, deque
from typing import Any, Callable, Iterator, Optional

from . import sampling
from .adapters import AdapterCache
from .bindings import llama_cpp
from .engine import Engine
from .errors import InsufficientMemory, LocalGemmaError
from .generation import Chunk, Decoder, GenerationRequest
from .memory import cached_sequences, pad_ctx

log = logging.getLogger("localgemma")
FAIR_STEPS = 32  # steps one adapter set may keep admitting while another set waits
MIN_REUSE = 8  # a cached start shorter than this is not worth its cells (every prompt shares <bos>)
# Prompts that arrive together are prefilled half at a time: each step takes (first come
# first) prompts until it carries half the prompt tokens waiting, and the next step takes every
# prompt the previous one passed over. On a CPU, prefill costs about the same per token in any
# batch past a few dozen tokens, and every step also pays a fixed cost (the weights read once,
# the decoding sequences' tokens); so one step for all delays every first token until the last
# prompt is done, one step each pays the fixed cost per prompt, and halves put the first half's
# first tokens out at about half the time, the rest no later than all-at-once plus one step.
# Halving the rest again would put the last prompt's first token a step later each time.
# Measured in the README's performance section.


# Takes a sequence's items; may return what to call before the next step (see _Sequence).
Emit = Callable[[Any], Optional[Callable[[], None]]]


class _Sequence:
    """One request's state in the batch; owned by the loop thread once admitted. `emit` takes
    its chunks, in the loop thread: each text Chunk, then the last Chunk (finish_reason set), an
    exception, or None (it was cancelled), after which nothing more. It may return a function:
    the loop calls it once the step's chunks are all emitted, before the next step, when no
    other sequence runs or waits (a consumer that wants its first chunk written before decoding
    takes the CPU back waits there, bounded). With others in the batch their next step comes
    first: a wait would stall them all, for as long as the event loop is busy with their
    tokens and arrivals. (Measured at 8 streams, waiting or not made no difference beyond the
    box's noise: p50 first token 208-225 ms, aggregate 141-146 tok/s, over 6 rounds.)"""

    def __init__(self, request: GenerationRequest, since: int, emit: Emit):
        self.request, self.since = request, since  # since: the step it started waiting at (fairness)
        self.group = request.adapters
        self.sampler = self.decoder = None
        self.emit = emit
        self.cancelled = False
        self.seq = -1
        self.pos = 0  # tokens of this sequence in the KV cache
        self.passed = False  # its prompt was waiting to be prefilled when a step ran
        self.reuse: Optional[tuple[int, int]] = None  # (cached id, tokens) its prompt starts with
        self.generated: list[int] = []  # sampled tokens fed back, in order (they follow the prompt)

    @property
    def need(self) -> int:
        return self.request.need

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.request.tokens

    def in_kv(self) -> tuple[int, ...]:
        """The tokens whose KV this sequence holds, in order."""
        prompt = self.request.tokens
        return prompt[:self.pos] if self.pos <= len(prompt) else prompt + tuple(self.generated[:self.pos - len(prompt)])

    def cancel(self) -> None:
        """From any thread: the loop frees the sequence before its next step (and emits None)."""
        self.cancelled = True


class BatchPolicy:
    """Admission, fairness and adapter-set hand-over, as data: the loop asks it who runs."""

    def __init__(self, parallel: int, n_ctx: int, keep: Optional[int] = None, keep_cells: Optional[int] = None):
        self.parallel, self.n_ctx = parallel, n_ctx
        self.waiting: deque = deque()
        self.running: dict[int, object] = {}
        self.free = list(range(parallel))[::-1]
        self.group: Optional[tuple] = None  # the adapter set on the context
        self.steps = 0
        # Prefix cache: finished sequences' KV kept under ids of their own (parallel and up), the
        # least recently used first, for requests that start the same way (a chat's next turn).
        self.keep = parallel if keep is None else keep
        # Cached cells are not free: every decode of every other sequence attends over the KV
        # cache's used span (masked), so they are capped at half the context (README: Batched decoding).
        self.keep_cells = n_ctx // 2 if keep_cells is None else keep_cells
        self.cached: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self.cache_free = list(range(parallel, parallel + self.keep))[::-1]
        self.dropped: list[int] = []  # cached ids whose cells the loop must free, then forget

    def fits_alone(self, need: int) -> bool:
        return need <= self.n_ctx

    def switch_to(self) -> Optional[tuple]:
        """The adapter set to put on the context now, or None to keep it: only when nothing
        runs and someone waits. Round-robin: the oldest waiting request of another set."""
        if self.running or not self.waiting:
            return None
        group = next((r.group for r in self.waiting if r.group != self.group), self.waiting[0].group)
        return None if group == self.group else group

    def admit(self) -> list:
        """Waiting requests of the current set that join now, each given a sequence id: first
        come, first served while slots and KV cells last, unless another set is starving. A
        joining request whose prompt starts as a cached sequence does gets `reuse` = (that
        id, tokens shared); cached sequences are dropped, least recently used first, when a
        request needs their cells (cells are counted as if none were shared: never too few)."""
        if self.running and self._starving():
            return []
        reserved = sum(r.need for r in self.running.values())
        cached = sum(len(t) for t in self.cached.values())
        joined = []
        for req in list(self.waiting):
            if not self.free:
                break
            if req.group != self.group:
                continue
            if reserved + req.need > self.n_ctx:
                break  # no small request overtakes a big one of the same set
            req.reuse = self._match(req.tokens)
            while reserved + req.need + cached > self.n_ctx:
                cached -= self._drop(next(iter(self.cached)))  # the loop copies `reuse` before it drops
            self.waiting.remove(req)
            req.seq = self.free.pop()
            self.running[req.seq] = req
            reserved += req.need
            joined.append(req)
        return joined

    def keep_tokens(self, tokens: tuple[int, ...]) -> Optional[int]:
        """A leaving sequence's KV (`tokens`, in order) is kept: the id the loop copies its cells
        to (after freeing `dropped`), or None. Cached sequences it starts with go (it holds
        all they do), and the least recently used ones while all ids are taken or the cached
        cells would pass `keep_cells`."""
        if len(tokens) < MIN_REUSE or not self.keep or len(tokens) > self.keep_cells:
            return None  # nothing could ever reuse it, or it is too big to keep
        for cid, old in list(self.cached.items()):
            if tokens[:len(old)] == old:
                self._drop(cid)
        cells = sum(len(t) for t in self.cached.values())
        while self.cached and (not self.cache_free or cells + len(tokens) > self.keep_cells):
            cells -= self._drop(next(iter(self.cached)))
        cid = self.cache_free.pop()
        self.cached[cid] = tokens
        return cid

    def forget(self) -> None:
        """The context's memory was cleared (an adapter switch): nothing is cached any more."""
        self.cached.clear()
        self.cache_free = list(range(self.parallel, self.parallel + self.keep))[::-1]
        self.dropped.clear()

    def _match(self, prompt: tuple[int, ...]) -> Optional[tuple[int, int]]:
        """(cached id, tokens shared) for the cached sequence sharing the longest start with
        `prompt`, never all of it (its last token is decoded for the first sample); or None."""
        best, most = None, MIN_REUSE - 1
        for cid, tokens in self.cached.items():
            n = shared_prefix(tokens, prompt, len(prompt) - 1)
            if n > most:
                best, most = cid, n
        if best is None:
            return None
        self.cached.move_to_end(best)
        return best, most

    def _drop(self, cid: int) -> int:
        tokens = self.cached.pop(cid)
        self.dropped.append(cid)
        self.cache_free.append(cid)
        return len(tokens)

    @staticmethod
    def prefill(left: list[int], room: int, owed: int = 0) -> list[int]:
        """How many tokens of each unfinished prompt (in admission order; `left`: tokens still
        to prefill) this step takes, with `room` slots left in the batch: first come first,
        each prompt whole while it fits, until half the waiting prompt tokens are in, and at
        least the first `owed` prompts (those an earlier step passed over) whole."""
        goal = max((sum(left) + 1) // 2, sum(left[:owed]))
        takes: list[int] = []
        total = 0
        for need in left:
            if total >= goal or room == 0:
                break
            take = min(need, room)
            takes.append(take)
            total, room = total + take, room - take
        return takes

    def leave(self, req) -> None:
        del self.running[req.seq]
        self.free.append(req.seq)

    def _starving(self) -> bool:
        return any(r.group != self.group and self.steps - r.since > FAIR_STEPS for r in self.waiting)


def shared_prefix(a: tuple[int, ...], b: tuple[int, ...], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit` (slice compares run in C)."""
    lo, hi = 0, max(0, min(len(a), len(b), limit))
    if a[:hi] == b[:hi]:
        return hi
    hi -= 1
    while lo < hi:  # the answer is in [lo, hi]: a[:lo] == b[:lo]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Batcher:
    def __init__(self, engine: Engine, parallel: int, n_ctx: int):
        self.engine = engine
        self.parallel = parallel
        # finished sequences whose KV is kept for prompts that start the same way (the memory
        # estimate counts their sequence ids too)
        self.keep = cached_sequences(parallel)
        self._ctx = self._new_context(n_ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)  # the engine's, or less for a batch context under 512
        self.policy = BatchPolicy(parallel, llama_cpp.llama_n_ctx(self._ctx), keep=self.keep)
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to the prefix cache, in all
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # Adapter handles belong to the model, activation to a context: a cache of our own keeps
        # the engine's cache (used under the engine's lock) from evicting a handle active here.
        self.adapters = AdapterCache(engine._model)
        self._cv = threading.Condition()
        self._exclusive = 0  # requests running on the engine's own context: the loop waits
        self._busy = self._closed = False
        self._outbox: list[tuple[_Sequence, Any]] = []  # this step's chunks, sent when it is sampled
        self._thread = threading.Thread(target=self._loop, name="localgemma-batch", daemon=True)
        self._thread.start()

    @property
    def steps(self) -> int:
        return self.policy.steps

    def _new_context(self, n_ctx: int):
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = pad_ctx(n_ctx)
        cparams.n_batch = cparams.n_ubatch = self.engine.n_batch
        cparams.n_seq_max = self.parallel + self.keep  # the running sequences, and the cached ones
        cparams.kv_unified = True  # one pool of cells: a long request may use what short ones leave
        self.engine.set_kv_type(cparams)
        cparams.n_threads = cparams.n_threads_batch = self.engine.n_threads
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.engine._model, cparams)
        if not ctx:
            raise InsufficientMemory(f"llama.cpp could not create a {n_ctx}-token batch context")
        return ctx

    # -- requests (any thread) --------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        """Engine.generate's contract. Batched unless seeded or too big for the pool: those run
        alone on the engine's context (bit-identical to solo, prefix cache included)."""
        if request.sampling.seed is not None or not self.policy.fits_alone(request.need):
            return self._solo(self.engine.generate(request))
        return self._batched(request)

    def _solo(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        with self.exclusive():
            yield from chunks

    def submit(self, request: GenerationRequest, emit: Emit) -> Optional[Callable[[], None]]:
        """`generate`, pushed: the loop thread hands each chunk to `emit` (see _Sequence), so no
        thread of the caller's wakes per token. Returns the function that cancels the request;
        None if the request must run alone (see `generate`): nothing was taken."""
        if request.sampling.seed is not None or not self.policy.fits_alone(request.need):
            return None
        return self._enqueue(request, emit).cancel

    def _enqueue(self, request: GenerationRequest, emit: Emit) -> _Sequence:
        req = _Sequence(request, self.policy.steps, emit)
        e = self.engine
        req.sampler = sampling.make_sampler(request.sampling, e._vocab, e.n_vocab, self.policy.n_ctx)
        req.decoder = Decoder(request, e.piece, e.is_eog)
        with self._cv:
            self.policy.waiting.append(req)
            self._cv.notify_all()
        return req

    def _batched(self, request: GenerationRequest) -> Iterator[Chunk]:
        out: queue.SimpleQueue = queue.SimpleQueue()
        req = self._enqueue(request, out.put)
        try:
            while True:
                item = out.get()
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
        policy = self.policy
        while True:
            with self._cv:
                while not self._closed and (self._exclusive or not (policy.running or policy.waiting)):
                    self._cv.wait()
                if self._closed:
                    return
                self._reap()
                group = policy.switch_to()
                if group is not None:
                    self._switch(group)
                for req in policy.admit():
                    self._reuse(req)
                self._free_dropped()
                self._busy = bool(policy.running)
            try:
                if policy.running:
                    self._step()
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _reap(self) -> None:
        """Cancelled requests leave now: their KV cells and sequence id are free for the next."""
        for req in [r for r in self.policy.running.values() if r.cancelled]:
            self._leave(req, None)
        for req in [r for r in self.policy.waiting if r.cancelled]:
            self.policy.waiting.remove(req)
            self._end(req, None)

    def _reuse(self, req: _Sequence) -> None:
        """A joining request starts from the cached KV its prompt shares (shared cells: the
        unified KV cache gives a cell to several sequences, nothing is copied)."""
        if req.reuse is not None:
            cid, n = req.reuse
            llama_cpp.llama_memory_seq_cp(self._mem, cid, req.seq, 0, n)
            req.pos = n
            self.reused_tokens += n

    def _free_dropped(self) -> None:
        for cid in self.policy.dropped:
            llama_cpp.llama_memory_seq_rm(self._mem, cid, -1, -1)
        self.policy.dropped.clear()

    def _clear_memory(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, False)
        self.policy.forget()

    def _switch(self, group: tuple) -> None:
        """Make `group` the context's adapter set. Nothing is running, so no KV computed under
        the old set survives (its cells are freed anyway, for good measure)."""
        self._clear_memory()
        try:
            self.adapters.activate(self._ctx, group)
            self.policy.group = group
        except Exception as exc:  # noqa: BLE001 - an unloadable adapter fails only its own requests
            self.policy.group = None
            for req in [r for r in self.policy.waiting if r.group == group]:
                self.policy.waiting.remove(req)
                self._end(req, exc)

    def _step(self) -> None:
        rows = self._fill()
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        self.policy.steps += 1
        if rc != 0:
            error = LocalGemmaError(f"llama_decode failed with code {rc} (out of context or memory)")
            with self._cv:
                for req in list(self.policy.running.values()):
                    self._leave(req, error, keep=False)  # its KV is not known to be sound
            return
        # The step's chunks go out together once every row is sampled: a consumer that wakes
        # per delivery (an event loop) then wakes once per step, not once per sequence.
        try:
            for req, idx in rows:
                self._advance(req, idx)
        finally:
            outbox, self._outbox = self._outbox, []
            after = [self._emit(req, item) for req, item in outbox]
            alone = len(self.policy.running) <= 1 and not self.policy.waiting
            for wait in after if alone else ():
                if callable(wait):  # what an emit returned (see _Sequence)
                    try:
                        wait()
                    except Exception:  # noqa: BLE001 - a consumer's failure must not stop the loop for all
                        log.exception("a request's consumer failed while the batch waited on it")

    def _fill(self) -> list[tuple[_Sequence, int]]:
        """This step's batch: every decoding sequence's last token first (one each), then the
        prompt tokens `BatchPolicy.prefill` picks. Returns (request, logits row) to sample."""
        batch, n, rows = self._batch, 0, []
        running = list(self.policy.running.values())
        for req in running:
            if req.pos >= len(req.request.tokens):
                req.generated.append(req.decoder.last_token)
                n = self._put(batch, n, req, req.decoder.last_token, True)
                rows.append((req, n - 1))
        pending = [r for r in running if r.pos < len(r.request.tokens)]
        room = self.n_batch - n
        owed = sum(r.passed for r in pending)  # passed over before: the first ones, by admission
        takes = self.policy.prefill([len(r.request.tokens) - r.pos for r in pending], room, owed)
        for req in pending:
            req.passed = True
        for req, take in zip(pending, takes):
            prompt = req.request.tokens
            for _ in range(take):
                last = req.pos == len(prompt) - 1
                n = self._put(batch, n, req, prompt[req.pos], last)
                if last:
                    rows.append((req, n - 1))
        batch.n_tokens = n
        return rows

    @staticmethod
    def _put(batch, n: int, req: _Sequence, token: int, logits: bool) -> int:
        batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, req.pos, 1
        batch.seq_id[n][0], batch.logits[n] = req.seq, logits
        req.pos += 1
        return n + 1

    def _advance(self, req: _Sequence, idx: int) -> None:
        """Sample this sequence's next token from its row; stream its text; end it if done."""
        token = req.sampler.sample(self._ctx, idx)
        logits = self.engine.logits_row(self._ctx, idx) if req.request.logprobs is not None else None
        text = req.decoder.step(token, logits)
        if text or req.decoder.logprobs:
            self._outbox.append((req, Chunk(text, logprobs=req.decoder.logprobs)))
        if req.decoder.finish:
            with self._cv:
                self._leave(req, None, emit=False)
            self._outbox.append((req, req.decoder.last()))

    def _leave(self, req: _Sequence, item, emit: bool = True, keep: bool = True) -> None:
        """The sequence leaves the batch; its KV is kept in the prefix cache (`keep`) or freed."""
        cid = self.policy.keep_tokens(req.in_kv()) if keep else None
        self._free_dropped()
        if cid is not None:
            llama_cpp.llama_memory_seq_cp(self._mem, req.seq, cid, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._mem, req.seq, -1, -1)
        self.policy.leave(req)
        self._end(req, item, emit)

    def _end(self, req: _Sequence, item, emit: bool = True) -> None:
        """The sequence is gone from the batch; `item` (an error, or None when it was
        cancelled) is its last emit -- unless its last chunk goes out with the step's (emit=False)."""
        req.sampler.free()
        if emit:
            self._emit(req, item)

    @staticmethod
    def _emit(req: _Sequence, item) -> Optional[Callable[[], None]]:
        try:
            return req.emit(item)
        except Exception:  # noqa: BLE001 - a consumer's failure must not stop the loop for all
            log.exception("a request's consumer failed; the request is cancelled")
            req.cancelled = True
            return None

    # -- measurement ------------------------------------------------------------------------

    def teacher_forced(self, seqs, start: int) -> list:
        """Per-step logits of sequences decoded together, as generation decodes them: each
        sequence's first `start` tokens prefilled in one shared batch, then one token per
        sequence per step. Returns, per sequence, float32 rows for tokens[start-1:] (row k is
        the distribution after tokens[:start+k]). Only while the batcher is idle."""
        import numpy as np

        with self.exclusive():
            assert not self.policy.running, "teacher_forced needs an idle batcher"
            self._switch(())
            assert len(seqs) * start <= self.n_batch and len(seqs) <= self.parallel
            out = [[] for _ in seqs]
            pos = [0] * len(seqs)
            for k in range(max(len(s) for s in seqs) - start + 1):
                n, rows = 0, []
                for i, tokens in enumerate(seqs):
                    upto = min(start if k == 0 else start + k, len(tokens))
                    while pos[i] < upto:
                        b = self._batch
                        b.token[n], b.pos[n], b.n_seq_id[n] = tokens[pos[i]], pos[i], 1
                        b.seq_id[n][0], b.logits[n] = i, pos[i] == upto - 1
                        pos[i] += 1
                        n += 1
                        if pos[i] == upto:
                            rows.append((i, n - 1))
                self._batch.n_tokens = n
                if n == 0:
                    break
                if llama_cpp.llama_decode(self._ctx, self._batch) != 0:
                    raise LocalGemmaError("llama_decode failed")
                for i, idx in rows:
                    row = llama_cpp.llama_get_logits_ith(self._ctx, idx)
                    out[i].append(np.ctypeslib.as_array(row, shape=(self.engine.n_vocab,)).copy())
            self._clear_memory()
        return [np.stack(rows) for rows in out]

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(30)
        for req in list(self.policy.running.values()) + list(self.policy.waiting):
            self._emit(req, LocalGemmaError("the model was unloaded"))
        self.adapters.close()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
