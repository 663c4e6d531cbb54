"""Admission and generation threads.

Each request is a `Job`. Its preparation (validation, tokens, grammar; a model's first load)
can be blocking work, so it runs in a thread of the job's own -- unless it is sure to be quick
(`Runtime.quick`: a loaded model, a short text, no finetune or grammar), then the event loop
does it itself, which saves a thread's start and the GIL's hand-overs (0.8 to 1.3 ms of a
stream's time to first token on a 2-core box). A request the batcher takes is then pushed
(`Prepared.push`): the batch thread hands its chunks straight to the event loop, and the job's
thread is done. One that runs alone (--exact, a seed, too big for the batch) is pulled in a
thread of its own, chunk by chunk. Either way the items reach the loop through the scheduler's
`Mailbox`: whatever arrives together (a batch step's chunks for every stream) wakes the loop
once.

No generating thread waits on the loop, but once per stream: after a stream's first chunk it
waits (at most FIRST_HOLD; the batch thread only when nothing else is in the batch) until the
consumer says the chunk is written (`Job.sent_first`). Usually it is written already (the loop
took the GIL at the post). When the loop was not scheduled first, llama.cpp's threads took
every core for the next step and the first chunk waited for the scheduler to give the loop one
back: measured on a 2-core box, the median from the prompt's decode to the first write moved
between 1.2 and 3.4 ms from run to run; with the wait, 1.1 to 1.4.

Per model there is one line (`ModelQueue`): `slots` requests generate (1 with --exact;
--parallel N with batching, where the runtime's batcher decodes them together), at most
`max_queue` wait their turn on a FIFO semaphore, and the next one is refused at once with 429.
Waiting happens on the event loop, not in threads, so a request that leaves the line (its
client disconnected) costs nothing.

Cancellation: a pushed request is flagged for the batcher, which frees its sequence before
the next step. A pulled one is a flag its thread checks between chunks: when set, the thread
stops pulling and closes the runtime's generator itself (a generator must not be closed from
another thread while it runs), which frees the engine for the next in line.

A job's items are the runtime's: text Chunks (only for streams: a whole answer is gathered
before the loop hears of it, so the event loop wakes once) and, last, the Result.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from localgemma.errors import LocalGemmaError, ModelUnavailable, QueueFull
from localgemma.generation import Result
from localgemma.runtime import Prepared, Runtime

log = logging.getLogger("localgemma.server")
END = object()  # the job's last item: nothing follows
FIRST_HOLD = 0.005  # seconds a generating thread waits, at most, for a stream's first chunk to be written


@dataclass
class JobStats:
    """What a job did, for GET /debug/jobs: the cancellation test reads `chunks_after_cancel`."""

    id: int
    model: str
    stream: bool
    state: str = "waiting"  # waiting -> running -> done | cancelled | failed
    chunks: int = 0  # chunks pulled from the runtime
    chunks_after_cancel: int = 0  # pulled after cancel() was called
    queued_at: float = 0.0
    started_at: Optional[float] = None
    cancelled_at: Optional[float] = None
    ended_at: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Mailbox:
    """Calls from other threads onto one event loop. Those posted while a wake-up is pending
    ride on it: however many arrive together, the loop wakes once (call_soon_threadsafe writes
    to the loop's self-pipe on every call)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable, tuple]] = []

    def post(self, fn: Callable, *args: Any) -> None:
        with self._lock:
            self._calls.append((fn, args))
            if len(self._calls) > 1:
                return  # a wake-up is pending: it takes this one too
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
            with self._lock:
                self._calls.clear()

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - as asyncio does for a callback: log it, run the rest
                log.exception("a call posted to the event loop failed")


class Job:
    """One request's generation; iterate it (async) for its items."""

    def __init__(self, runtime: Runtime, model: Optional[str], inputs: Any, stats: JobStats,
                 on_exit: Callable[[], None], mailbox: Mailbox, options: Optional[dict] = None,
                 hold_first: bool = False):
        """`hold_first`: the consumer will call `sent_first` once the first chunk is written;
        the generating thread waits for that (see the module's docstring)."""
        self.runtime, self.model, self.inputs, self.stats = runtime, model, inputs, stats
        self._hold = hold_first
        self._first_out = threading.Event()
        self.options = options or {}  # for Runtime.open (logprobs)
        self._mailbox = mailbox
        self._items: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._complete = False  # the last chunk (the one with usage) has been produced
        self._on_exit = on_exit
        self._stop_batched: Optional[Callable[[], None]] = None  # set once the batcher has it

    def start(self, quick: bool = False) -> None:
        """Prepare and start generating: `quick` (see Runtime.quick), preparing here, in the
        event loop; else in a thread of the job's own."""
        self.stats.state, self.stats.started_at = "running", time.monotonic()
        if not quick:
            self._thread(self._work)
            return
        prepared = self._open()
        if prepared is not None:
            self._thread(lambda: self._pull(prepared))

    def _thread(self, target: Callable[[], None]) -> None:
        threading.Thread(target=target, name=f"localgemma-job-{self.stats.id}", daemon=True).start()

    def sent_first(self) -> None:
        """The consumer has written the first chunk: a generating thread waiting for it goes on."""
        self._first_out.set()

    def cancel(self) -> None:
        self._first_out.set()
        if not (self._finished.is_set() or self._cancel.is_set() or self._complete):
            self.stats.cancelled_at = time.monotonic()
            self._cancel.set()
            if self._stop_batched is not None:
                self._stop_batched()

    def join(self, timeout: float) -> bool:
        return self._finished.wait(timeout)

    async def get(self) -> Any:
        """The next item: a result dict or chunk dict, or END; a failure is raised here."""
        item = await self._items.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def __aiter__(self):
        return self

    async def __anext__(self) -> Any:
        item = await self.get()
        if item is END:
            raise StopAsyncIteration
        return item

    # -- the thread ------------------------------------------------------------------------

    def _work(self) -> None:
        prepared = self._open()
        if prepared is not None:
            self._pull(prepared)

    def _open(self) -> Optional[Prepared]:
        """Prepare the request and hand it to the batcher. Returns it when it must be pulled
        instead (it runs alone); None when that is done, or it failed or was cancelled."""
        try:
            if not self._cancel.is_set():
                prepared = self.runtime.open(self.model, self.inputs, **self.options)
                stop = prepared.push(self._take)
                if stop is None:
                    return prepared
                self._stop_batched = stop  # the batch thread has it now
                if self._cancel.is_set() or self._finished.is_set():  # while it was handed over
                    stop()
                return None
        except BaseException as exc:  # noqa: BLE001 - every failure is the request's answer
            self._fail(exc)
        self._finish()
        return None

    def _pull(self, prepared: Prepared) -> None:
        try:
            self._drain(prepared.run(prepared.generate()))
        except BaseException as exc:  # noqa: BLE001 - every failure is the request's answer
            self._fail(exc)
        finally:
            self._finish()

    def _take(self, item: Any) -> Optional[Callable[[], None]]:
        """A pushed request's items, in the batch thread: a Chunk or the Result; an exception
        if it failed; None if it ended cancelled. Never raises (it would stop the batcher).
        Returns what the batch thread waits on before its next step, if anything."""
        if self._finished.is_set():
            return None
        try:
            if isinstance(item, BaseException):
                self._fail(item)
            elif item is not None:
                after = self._deliver(item)
                if not isinstance(item, Result):
                    return after
        except BaseException as exc:  # noqa: BLE001 - the request's answer, not the batcher's problem
            self._fail(exc)
        self._finish()
        if self.stats.state == "failed" and self._stop_batched is not None:
            self._stop_batched()  # it may have failed before the batcher was done with it
        return None

    def _drain(self, items) -> None:
        try:
            for item in items:
                after = self._deliver(item)
                if after is not None:
                    after()
                if self._cancel.is_set():
                    break
        finally:
            items.close()  # here, in the generating thread: releases the engine at once

    def _deliver(self, item: Any) -> Optional[Callable[[], None]]:
        """A text chunk (streams only: a whole answer is gathered) or the Result, to the loop.
        Returns, for a stream's first chunk when the consumer asked (hold_first), the wait for
        it to be written."""
        self._count(item)
        if self.stats.stream or isinstance(item, Result):
            self._put(item)
            if self._hold and not isinstance(item, Result):
                self._hold = False
                return self._wait_first
        return None

    def _wait_first(self) -> None:
        self._first_out.wait(FIRST_HOLD)

    def _fail(self, exc: BaseException) -> None:
        self.stats.state = "failed"
        self._put(exc)

    def _count(self, item: Any) -> None:
        self._complete = isinstance(item, Result)
        self.stats.chunks += 1
        if self._cancel.is_set():
            self.stats.chunks_after_cancel += 1

    def _finish(self) -> None:
        if self.stats.state == "running":
            self.stats.state = "cancelled" if self._cancel.is_set() else "done"
        self.stats.ended_at = time.monotonic()
        self._finished.set()
        self._mailbox.post(self._on_exit)  # first: by the time END is read, the line is free again
        self._put(END)

    def _put(self, item: Any) -> None:
        self._mailbox.post(self._items.put_nowait, item)


class ModelQueue:
    """One model's line: `slots` requests generating, at most `depth` waiting."""

    def __init__(self, key: str, depth: int, slots: int = 1):
        self.key, self.depth, self.slots = key, depth, slots
        self.turn = asyncio.Semaphore(slots)  # FIFO (Python >= 3.11.1): served in arrival order
        self.admitted = 0  # generating + waiting

    def admit(self, model: str) -> None:
        if self.admitted >= self.slots + self.depth:
            raise QueueFull(f"{model} is busy: {self.slots} request{'s' if self.slots > 1 else ''} generating and "
                            f"{self.depth} waiting (localgemma serve --max-queue {self.depth}); retry later")
        self.admitted += 1

    def leave(self) -> None:
        self.admitted -= 1


class Scheduler:
    def __init__(self, runtime: Runtime, max_queue: int, history: int = 256, slots: int = 1):
        self.runtime = runtime
        self.max_queue, self.slots = max_queue, slots
        self._queues: dict[str, ModelQueue] = {}
        self._active: set[Job] = set()
        self._ids = itertools.count(1)
        self.history: collections.deque[JobStats] = collections.deque(maxlen=history)
        self._mailbox: Optional[Mailbox] = None

    def queue_for(self, model: Optional[str]) -> ModelQueue:
        key = _engine_key(model)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = ModelQueue(key, self.max_queue, self.slots)
        return queue

    async def start(self, model: Optional[str], inputs: Any, hold_first: bool = False, **options: Any) -> Job:
        """Admit (or raise QueueFull at once), wait for the model's turn, start generating.
        `hold_first`: see Job."""
        from localgemma.models import EMBEDDED_ID

        queue = self.queue_for(model)
        queue.admit(model or EMBEDDED_ID)
        stats = JobStats(next(self._ids), model or EMBEDDED_ID, bool(getattr(inputs, "stream", False)),
                         queued_at=time.monotonic())
        self.history.append(stats)
        try:
            await queue.turn.acquire()
        except BaseException:
            stats.state, stats.ended_at = "cancelled", time.monotonic()
            queue.leave()
            raise
        job = Job(self.runtime, model, inputs, stats, on_exit=lambda: self._release(queue, job),
                  mailbox=self._mailbox_here(), options=options, hold_first=hold_first)
        self._active.add(job)
        job.start(quick=self.runtime.quick(model, inputs))
        return job

    def _mailbox_here(self) -> Mailbox:
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        return self._mailbox

    def _release(self, queue: ModelQueue, job: Job) -> None:
        self._active.discard(job)
        queue.turn.release()
        queue.leave()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every running generation and wait (bounded) for the threads: freeing an
        engine under a thread still inside llama.cpp would crash the process."""
        jobs = list(self._active)
        for job in jobs:
            job.cancel()
        deadline = time.monotonic() + timeout
        for job in jobs:
            job.join(max(0.0, deadline - time.monotonic()))


def _engine_key(model: Optional[str]) -> str:
    """Requests share a line when they share an engine: key by the resolved file when it
    can be had without downloading, else by the id (the runtime downloads it later)."""
    from localgemma.models import resolve

    try:
        return str(resolve(model, download=False).resolve())
    except ModelUnavailable:
        return f"id:{model}"
    except LocalGemmaError:
        raise  # unknown model: refused before it takes a place in any line
