"""The server's pieces without a model: OpenAI -> contract translation, error shapes, and the
scheduler (admission, FIFO turns, cancellation between chunks) driven by a fake runtime."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi.exceptions import RequestValidationError

from localgemma.contract import parse_inputs
from localgemma.errors import InvalidInput, QueueFull, UnknownModel, Unsupported
from localgemma.generation import Chunk, Result, Usage
from localgemma.models import EMBEDDED_ID
from localgemma.server import errors, queue
from localgemma.server.openai_shim import chat_inputs, chat_logprobs, completion_inputs, split_model
from localgemma.server.openai_types import ChatCompletionRequest, CompletionRequest
from localgemma.server.sse import dumps

TWO_B = "@cf/google/gemma-2b-it-lora"


@pytest.fixture(autouse=True)
def _served(fake_gguf):
    """TWO_B is served (bound to a file for this process), as in `serve --model TWO_B=...`."""
    from localgemma import models

    models.bind(TWO_B, fake_gguf, persist=False)
    yield
    models.unbind(TWO_B)


# -- translation -------------------------------------------------------------------------------

def chat(**fields):
    return chat_inputs(ChatCompletionRequest(model=TWO_B, messages=[{"role": "user", "content": "hi"}], **fields))


def test_chat_translation_is_exact():
    req = ChatCompletionRequest(model=f"{TWO_B}:style", messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None}],
        max_completion_tokens=20, temperature=0, top_p=0.9, seed=7, presence_penalty=0.5, stream=True,
        response_format={"type": "text"}, n=1, stop=None, logprobs=False, user="me")
    model, inputs = chat_inputs(req)
    assert model == TWO_B
    assert inputs == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                                   {"role": "assistant", "content": ""}],
                      "stream": True, "temperature": 0, "top_p": 0.9, "seed": 7, "presence_penalty": 0.5,
                      "lora": "style", "max_tokens": 20}
    parse_inputs(inputs)  # what the shim makes is a valid contract request


def test_an_unknown_response_format_type_lists_all_three():
    with pytest.raises(InvalidInput, match="response_format.type: \"xml\" is not accepted; send 'text', "
                                           "'json_object' or 'json_schema'"):
        chat(response_format={"type": "xml"})


def test_completion_translation_is_raw():
    model, inputs = completion_inputs(CompletionRequest(model=TWO_B, prompt=["Once"], max_tokens=3, top_k=5))
    assert (model, inputs) == (TWO_B, {"prompt": "Once", "raw": True, "stream": False, "top_k": 5, "max_tokens": 3})


@pytest.mark.parametrize("fields, param", [
    ({"n": 3}, "n"), ({"frequency_penalty": -0.1}, "frequency_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
])
def test_chat_refusals_name_the_param(fields, param):
    with pytest.raises(Unsupported) as err:
        chat(**fields)
        chat_logprobs(ChatCompletionRequest(model=TWO_B, messages=[{"role": "user", "content": "hi"}], **fields))
    assert err.value.param == param and err.value.status == 400 and err.value.message.startswith(param)


def test_stop_and_logprobs_reach_the_runtime():
    assert chat(stop="x")[1]["stop"] == "x" and chat(stop=["a", "b"])[1]["stop"] == ["a", "b"]
    assert chat_logprobs(ChatCompletionRequest(model=TWO_B, messages=[{"role": "user", "content": "hi"}],
                                               logprobs=True, top_logprobs=3)) == 3
    assert chat_logprobs(ChatCompletionRequest(model=TWO_B, messages=[{"role": "user", "content": "hi"}])) is None


def test_neutral_values_pass():
    assert chat(n=1, stop=[], logprobs=False, frequency_penalty=0, tool_choice="none")[1]["frequency_penalty"] == 0
    assert chat(parallel_tool_calls=False)[1]["messages"]  # accepted: one call per turn honours both


def test_tools_and_tool_choice_pass_to_the_contract():
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
    _, inputs = chat(tools=[tool], tool_choice="required")
    assert inputs["tools"] == [tool] and inputs["tool_choice"] == "required"


def test_image_parts_and_tool_history_are_refused():
    with pytest.raises(Unsupported, match=r"messages\[0\].content\[1\]"):
        chat_inputs(ChatCompletionRequest(model=TWO_B, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "x"}}]}]))
    with pytest.raises(InvalidInput, match=r"messages\[0\].tool_calls\[0\]"):
        parse_inputs(chat_inputs(ChatCompletionRequest(model=TWO_B, messages=[{"role": "assistant", "content": None,
                                                                               "tool_calls": [{"id": "1"}]}]))[1])


@pytest.mark.parametrize("fields, param", [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"),
                                           ({"best_of": 2}, "best_of"), ({"prompt": ["a", "b"]}, "prompt")])
def test_completion_refusals(fields, param):
    with pytest.raises(Unsupported) as err:
        completion_inputs(CompletionRequest(**{"model": TWO_B, "prompt": "a", **fields}))
    assert err.value.param == param


def test_split_model():
    assert split_model(TWO_B) == (TWO_B, None)
    assert split_model(f"{EMBEDDED_ID}:my-adapter") == (EMBEDDED_ID, "my-adapter")
    with pytest.raises(UnknownModel):
        split_model("@cf/nope:adapter")
    with pytest.raises(UnknownModel):
        split_model("/etc/some.gguf")  # paths are not models over HTTP


def test_sse_json_is_compact_utf8():
    assert dumps({"response": "é\u2028\n"}) == '{"response":"é\u2028\\n"}'


# -- error shapes ------------------------------------------------------------------------------

def test_error_shapes():
    exc = InvalidInput("temperature: must be <= 5 (got 9)")
    assert errors.envelope_body(exc) == {"result": {}, "success": False, "messages": [],
                                         "errors": [{"code": 3010, "message": exc.message}]}
    assert errors.openai_body(exc) == {"error": {"message": exc.message, "type": "invalid_request_error",
                                                 "param": "temperature", "code": "3010"}}
    assert errors.openai_body(QueueFull("busy"))["error"]["type"] == "rate_limit_error"
    assert errors.render({"path": "/v1/models"}, UnknownModel("no")).status_code == 404
    assert errors.render({"path": "/client/v4/accounts/a/ai/run/x"}, UnknownModel("no")).status_code == 400


def test_validation_errors_are_one_line_per_field():
    exc = RequestValidationError([
        {"type": "missing", "loc": ("body", "model"), "msg": "Field required", "input": {}},
        {"type": "extra_forbidden", "loc": ("body", "foo"), "msg": "Extra inputs are not permitted", "input": 1}])
    err = errors.validation_error(exc)
    assert err.message == "model: Field required; foo: unknown or unsupported parameter" and err.param == "model"
    assert err.code == 3010 and err.status == 400
    bad = RequestValidationError([{"type": "json_invalid", "loc": ("body", 7), "msg": "JSON decode error",
                                   "input": {}, "ctx": {"error": "Expecting value"}}])
    assert errors.validation_error(bad).message.startswith("malformed JSON body: Expecting value (at character 7)")


# -- scheduler with a fake runtime -------------------------------------------------------------

class FakeRuntime:
    """Runtime stand-in, pulled (as for a request that runs alone): `n` chunks, one per `delay`
    seconds, then the Result; it records where its generator was closed."""

    def __init__(self, n=1000, delay=0.002, quick=False):
        self.n, self.delay, self.is_quick = n, delay, quick
        self.pulled = 0
        self.closed_in = None
        self.gate = threading.Event()
        self.gate.set()

    @property
    def emitted(self):
        return self.pulled

    def quick(self, model, inputs):
        return self.is_quick

    def open(self, model, inputs):
        if getattr(inputs, "fail", False):
            raise InvalidInput("fail: asked to")
        return SimpleNamespace(push=lambda emit: None, generate=lambda: self._items(self.n if inputs.stream else 0),
                               run=lambda chunks: chunks)

    def _items(self, n):
        try:
            for i in range(n):
                self.gate.wait()
                time.sleep(self.delay)
                self.pulled += 1
                yield Chunk(str(i))
            yield Result("whole" if n == 0 else "", "stop", Usage(1, n))
        finally:
            self.closed_in = threading.get_ident()


class PushedRuntime:
    """Runtime stand-in for a batched request: `push` hands the items to a thread of its own
    (the batch thread), `n` chunks then the Result, until cancelled (then None), as
    Batcher.submit does; `fail_at`: an exception instead of that chunk."""

    def __init__(self, n=1000, delay=0.002, fail_at=None, quick=False):
        self.n, self.delay, self.fail_at, self.is_quick = n, delay, fail_at, quick
        self.emitted, self.threads, self.opened_in = 0, set(), None

    def quick(self, model, inputs):
        return self.is_quick

    def open(self, model, inputs):
        self.opened_in = threading.get_ident()
        return SimpleNamespace(push=lambda emit: self._push(emit, inputs.stream))

    def _push(self, emit, stream):
        cancelled = threading.Event()

        def batch():
            self.threads.add(threading.get_ident())
            for i in range(self.n if stream else 0):
                time.sleep(self.delay)
                if cancelled.is_set():
                    emit(None)
                    return
                if i == self.fail_at:
                    emit(InvalidInput("boom: the batch failed"))
                    return
                self.emitted += 1
                after = emit(Chunk(str(i)))
                if after is not None:  # as the batcher: before its next step
                    after()
            emit(Result("whole" if not stream else "", "stop", Usage(1, self.n)))

        threading.Thread(target=batch, daemon=True).start()
        return cancelled.set


def ask(stream=False, **more):
    return SimpleNamespace(stream=stream, **more)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(queue, "_engine_key", lambda model: model)
    return FakeRuntime()


def test_cancel_stops_within_a_chunk_and_closes_in_the_worker(fake):
    async def main():
        sched = queue.Scheduler(fake, max_queue=1)
        job = await sched.start("m", ask(stream=True))
        first = await job.get()
        await asyncio.sleep(0.05)
        job.cancel()
        pulled_at_cancel = fake.pulled
        await asyncio.to_thread(job.join, 5)
        return first, pulled_at_cancel, job

    first, pulled_at_cancel, job = asyncio.run(main())
    assert first == Chunk("0")
    assert fake.pulled - pulled_at_cancel <= 1 and job.stats.chunks_after_cancel <= 1
    assert job.stats.state == "cancelled" and fake.closed_in not in (None, threading.get_ident())


def test_queue_full_is_immediate_and_turns_are_fifo(fake):
    fake.gate.clear()  # the first job holds the model

    async def main():
        sched = queue.Scheduler(fake, max_queue=1)
        running = await sched.start("m", ask(stream=True))
        order = []

        async def later(tag):
            job = await sched.start("m", ask())
            order.append(tag)
            return await job.get()

        waiting = asyncio.create_task(later("second"))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="1 waiting"):
            await sched.start("m", ask())  # raises at once: no await on a turn
        other = await (await sched.start("other-model", ask())).get()  # its own line
        fake.gate.set()
        running.cancel()
        result = await waiting
        return order, result, other

    order, result, other = asyncio.run(main())
    assert order == ["second"] and result.text == "whole" and other.text == "whole"


def test_a_waiter_that_leaves_frees_its_place(fake):
    fake.gate.clear()

    async def main():
        sched = queue.Scheduler(fake, max_queue=1)
        running = await sched.start("m", ask(stream=True))
        waiter = asyncio.create_task(sched.start("m", ask()))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        replacement = asyncio.create_task(sched.start("m", ask()))  # admitted: the place is free
        await asyncio.sleep(0.01)
        fake.gate.set()
        running.cancel()
        return await (await replacement).get(), [s.state for s in sched.history]

    result, states = asyncio.run(main())
    assert result.text == "whole" and states[1] == "cancelled"


@pytest.mark.parametrize("quick", [False, True])
def test_failure_before_the_first_chunk_is_raised_by_get(fake, quick):
    fake.is_quick = quick  # quick: refused by the event loop itself, else in the job's thread

    async def main():
        sched = queue.Scheduler(fake, max_queue=0)
        job = await sched.start("m", ask(fail=True))
        with pytest.raises(InvalidInput, match="asked to"):
            await job.get()
        await asyncio.to_thread(job.join, 5)
        return await (await sched.start("m", ask())).get()  # the line is free again

    assert asyncio.run(main()).text == "whole"


@pytest.mark.parametrize("quick", [False, True])
def test_a_pushed_request_streams_from_the_batch_thread_and_cancels_there(monkeypatch, quick):
    monkeypatch.setattr(queue, "_engine_key", lambda model: model)
    runtime = PushedRuntime(delay=0.005, quick=quick)

    async def main():
        sched = queue.Scheduler(runtime, max_queue=1)
        whole = await (await sched.start("m", ask())).get()  # not streamed: only the Result
        job = await sched.start("m", ask(stream=True))
        chunks = [await job.get() for _ in range(5)]
        job.cancel()
        rest = []
        async for item in job:  # the batcher ends it: what was on its way, then END
            rest.append(item)
        return whole, chunks, rest, job

    whole, chunks, rest, job = asyncio.run(main())
    assert whole.text == "whole" and chunks == [Chunk(str(i)) for i in range(5)]
    assert len(rest) <= 2 and all(isinstance(item, Chunk) for item in rest)
    assert job.stats.state == "cancelled" and job.stats.chunks_after_cancel <= 2 and job._finished.is_set()
    assert runtime.emitted < 20  # the batch thread stopped, not the job's
    # quick: prepared by the event loop itself (the test's main thread), not a job's thread
    assert (runtime.opened_in == threading.get_ident()) == quick


@pytest.mark.parametrize("quick", [False, True])
def test_a_pushed_failure_mid_stream_is_raised_and_frees_the_line(monkeypatch, quick):
    monkeypatch.setattr(queue, "_engine_key", lambda model: model)

    async def main():
        sched = queue.Scheduler(PushedRuntime(n=3, fail_at=2, quick=quick), max_queue=0)
        job = await sched.start("m", ask(stream=True))
        got = [await job.get(), await job.get()]
        with pytest.raises(InvalidInput, match="boom"):
            await job.get()
        assert await job.get() is queue.END
        return got, job, sched.queue_for("m").admitted  # freed before END was read

    got, job, admitted = asyncio.run(main())
    assert got == [Chunk("0"), Chunk("1")] and job.stats.state == "failed" and admitted == 0


@pytest.mark.parametrize("quick", [False, True])
def test_a_request_that_fails_while_being_handed_to_the_batcher_is_stopped_there(monkeypatch, quick):
    monkeypatch.setattr(queue, "_engine_key", lambda model: model)
    stopped = threading.Event()

    def push(emit):  # the batch thread can emit before push has returned
        emit(Chunk("0"))
        emit(InvalidInput("boom: at once"))
        return stopped.set

    runtime = SimpleNamespace(open=lambda model, inputs: SimpleNamespace(push=push), quick=lambda m, i: quick)

    async def main():
        sched = queue.Scheduler(runtime, max_queue=0)
        job = await sched.start("m", ask(stream=True))
        first = await job.get()
        with pytest.raises(InvalidInput, match="at once"):
            await job.get()
        return first, await job.get(), job

    first, last, job = asyncio.run(main())
    assert first == Chunk("0") and last is queue.END and job.stats.state == "failed"
    assert stopped.wait(5)  # the batcher is told, or it would decode to max_tokens for nobody


def _first_then_second(runtime, hold_first, between):
    """A stream's first chunk, `between(job)`, then its second; (first, chunks the batch had
    emitted when `between` ended, second, job)."""
    async def main():
        sched = queue.Scheduler(runtime, max_queue=0)
        job = await sched.start("m", ask(stream=True), hold_first=hold_first)
        first = await job.get()
        await between(job)
        emitted = runtime.emitted
        second = await asyncio.wait_for(job.get(), 5)
        job.cancel()
        return first, emitted, second, job

    return asyncio.run(main())


@pytest.mark.parametrize("quick", [False, True])
def test_a_stream_holds_the_batch_after_its_first_chunk_until_it_is_written(monkeypatch, quick):
    monkeypatch.setattr(queue, "_engine_key", lambda model: model)
    monkeypatch.setattr(queue, "FIRST_HOLD", 30.0)
    runtime = PushedRuntime(n=50, delay=0.001, quick=quick)

    async def written_later(job):
        await asyncio.sleep(0.2)  # 200 batch steps' time: the batch thread waits
        job.sent_first()

    first, emitted, second, _ = _first_then_second(runtime, True, written_later)
    assert (first, emitted, second) == (Chunk("0"), 1, Chunk("1"))


def test_the_hold_is_bounded_and_off_unless_asked(monkeypatch):
    monkeypatch.setattr(queue, "_engine_key", lambda model: model)
    monkeypatch.setattr(queue, "FIRST_HOLD", 0.01)

    async def never_written(job):
        await asyncio.sleep(0.2)

    first, emitted, second, _ = _first_then_second(PushedRuntime(n=50, delay=0.001), True, never_written)
    assert second == Chunk("1") and emitted > 1  # went on after FIRST_HOLD without sent_first
    monkeypatch.setattr(queue, "FIRST_HOLD", 30.0)
    first, emitted, second, _ = _first_then_second(PushedRuntime(n=50, delay=0.001), False, never_written)
    assert second == Chunk("1") and emitted > 1  # no hold asked: no wait at all


def test_cancelling_a_held_stream_releases_the_batch(monkeypatch):
    monkeypatch.setattr(queue, "_engine_key", lambda model: model)
    monkeypatch.setattr(queue, "FIRST_HOLD", 30.0)
    runtime = PushedRuntime(n=50, delay=0.001)

    async def main():
        sched = queue.Scheduler(runtime, max_queue=0)
        job = await sched.start("m", ask(stream=True), hold_first=True)
        await job.get()
        job.cancel()  # the client left before its first chunk was written
        return [item async for item in job], job

    rest, job = asyncio.run(asyncio.wait_for(main(), 10))
    assert len(rest) <= 1 and job.stats.state == "cancelled"


def test_pulled_streams_hold_too(fake, monkeypatch):
    """A request that runs alone (pulled in its own thread) waits the same way."""
    monkeypatch.setattr(queue, "FIRST_HOLD", 30.0)

    async def written_later(job):
        await asyncio.sleep(0.2)
        job.sent_first()

    first, emitted, second, _ = _first_then_second(fake, True, written_later)
    assert (first, emitted, second) == (Chunk("0"), 1, Chunk("1"))


def test_mailbox_wakes_the_loop_once_for_what_arrives_together():
    async def main():
        loop = asyncio.get_running_loop()
        box = queue.Mailbox(loop)
        wakes, got = [], []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(1), real(*a))[1]

        for i in range(8):  # one batch step's chunks, posted before the loop gets to run
            box.post(got.append, i)
        await asyncio.sleep(0.01)
        box.post(got.append, 8)  # later: a wake-up of its own
        await asyncio.sleep(0.01)
        return wakes, got

    wakes, got = asyncio.run(main())
    assert got == list(range(9)) and len(wakes) == 2


def test_preloader_reports_loading_then_ok(monkeypatch):
    from localgemma.server.app import Preloader

    gate = threading.Event()
    runtime = SimpleNamespace(load=lambda model: gate.wait(5) if model == "slow" else (_ for _ in ()).throw(
        UnknownModel("gone")))
    loader = Preloader(runtime, ["slow"])
    loader.start()
    assert loader.status() == "loading"
    gate.set()
    loader._thread.join(5)
    assert loader.status() == "ok" and loader.state == {"slow": "ready"}
    failing = Preloader(runtime, ["bad"])
    failing.start()
    failing._thread.join(5)
    assert failing.status() == "error" and failing.state["bad"] == "error: gone"


def test_an_unforeseen_error_is_a_500_in_the_api_shape_and_is_not_reraised():
    """Starlette re-raises after an Exception handler answers, and the server then closes the
    connection; middleware.Guard answers instead, in the API's shape, and re-raises nothing."""
    import httpx
    from fastapi import FastAPI

    from localgemma.server.middleware import Guard

    app = FastAPI()

    @app.get("/v1/boom")
    @app.get("/client/v4/boom")
    async def boom():
        raise RuntimeError("bug")

    errors.install(app)
    app.add_middleware(Guard)

    async def call(path):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path)

    r = asyncio.run(call("/client/v4/boom/"))  # a trailing slash is served, not redirected
    assert r.status_code == 500 and r.json()["errors"][0] == {
        "code": 3043, "message": "internal server error (RuntimeError); see the server log"}
    r = asyncio.run(call("/v1/boom"))
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


# -- EventStream: the SSE response -------------------------------------------------------------

def test_events_are_framed_as_sse():
    from localgemma.server.sse import frame

    assert frame({"data": '{"a":"x\u2028y"}'}) == 'data: {"a":"x\u2028y"}\n\n'.encode()  # U+2028 ends no line
    assert frame({"event": "done", "data": "a\nb\r\nc"}) == b"event: done\ndata: a\ndata: b\ndata: c\n\n"


def _run_stream(events, receive_after=None, send_delay=0.0, sent=None, **options):
    """Drive an EventStream as uvicorn would: returns (messages sent, whether the events'
    generator was closed). `receive_after`: seconds until the client disconnects."""
    from localgemma.server.sse import EventStream

    sent, closed = [] if sent is None else sent, []

    async def gen():
        try:
            async for item in events():
                yield item
        finally:
            closed.append(True)

    async def receive():
        if receive_after is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(receive_after)
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message["body"].startswith(b"data") and send_delay:
            await asyncio.sleep(send_delay)  # a client that stopped reading: the send never completes
        sent.append(message)

    async def main():
        await asyncio.wait_for(EventStream(gen(), **options)({"type": "http", "method": "POST"}, receive, send), 5)

    asyncio.run(main())
    return sent, bool(closed)


def test_an_event_stream_sends_each_event_then_ends_the_body():
    async def events():
        for i in range(3):
            yield {"data": str(i)}

    sent, closed = _run_stream(events)
    assert sent[0]["status"] == 200 and (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert [m["body"] for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    assert sent[-1]["more_body"] is False and closed


def test_an_event_stream_says_when_its_first_event_is_written():
    """What lets a held batch go on (Job.sent_first): called once, after the first event's send."""
    order = []

    async def events():
        for i in range(3):
            order.append(f"event {i}")
            yield {"data": str(i)}

    sent_so_far: list = []
    sent, _ = _run_stream(events, on_first=lambda: order.append(f"first written ({len(sent_so_far)} sent)"),
                          sent=sent_so_far)
    assert order == ["event 0", "first written (2 sent)", "event 1", "event 2"]


def test_event_response_and_ollamas_stream_release_the_hold():
    from localgemma.server.ollama import NDJSONResponse
    from localgemma.server.sse import event_response

    class FakeJob:
        released = 0

        def sent_first(self):
            self.released += 1

        def cancel(self):
            pass

    async def events():
        yield {"data": "x"}

    job = FakeJob()
    assert event_response(events(), job, lambda error: {"data": "e"}).on_first == job.sent_first

    async def lines():
        yield b'{"response":"x"}\n'
        yield b'{"response":"y"}\n'

    async def main():
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            await asyncio.sleep(3600)

        ollama_job = FakeJob()
        await asyncio.wait_for(NDJSONResponse(lines(), ollama_job)({"type": "http", "method": "POST",
                                                                   "asgi": {"spec_version": "2.4"}}, receive, send), 5)
        return ollama_job.released, sent

    released, sent = asyncio.run(main())
    assert released == 1 and any(m.get("body") == b'{"response":"x"}\n' for m in sent)  # once, not per line


def test_a_quiet_stream_pings_and_a_stalled_client_is_dropped():
    async def slow():
        yield {"data": "a"}
        await asyncio.sleep(0.35)  # a long prompt: nothing to send for a while
        yield {"data": "b"}

    sent, closed = _run_stream(slow, ping=0.1, tick=0.02)
    bodies = [m["body"] for m in sent[1:]]
    assert bodies[0] == b"data: a\n\n" and b": ping\n\n" in bodies and bodies[-2:] == [b"data: b\n\n", b""]

    async def many():
        for i in range(100):
            yield {"data": str(i)}

    sent, closed = _run_stream(many, send_delay=3600, send_timeout=0.1, tick=0.02)
    assert closed and len(sent) == 1  # only the start: the first event's send never finished


def test_a_client_that_disconnects_closes_the_events():
    async def endless():
        while True:
            await asyncio.sleep(0.01)
            yield {"data": "x"}

    sent, closed = _run_stream(endless, receive_after=0.1)
    assert closed and 1 < len(sent) < 50 and all(m.get("more_body", True) for m in sent[1:])


# -- the Responses API's request -----------------------------------------------------------------

def test_responses_text_and_include_take_only_what_openai_defines():
    from pydantic import ValidationError

    from localgemma.server.responses import ResponsesRequest

    for bad in ({"text": {"fromat": {"type": "json_object"}}}, {"text": {"format": {"type": "xml"}}},
                {"text": {"format": {"type": "json_schema", "schemma": {}}}}, {"include": ["bogus.thing"]}):
        with pytest.raises(ValidationError):
            ResponsesRequest(model=TWO_B, input="hi", **bad)
    req = ResponsesRequest(model=TWO_B, input="hi", include=["reasoning.encrypted_content"],
                           text={"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"},
                                            "strict": True}, "verbosity": "medium"})
    from localgemma.server.responses import responses_inputs

    assert responses_inputs(req)[1]["response_format"] == {"type": "json_schema",
                                                           "json_schema": {"schema": {"type": "object"}}}


def test_responses_errors_name_the_responses_fields():
    from localgemma.contract import parse_inputs
    from localgemma.server.errors import worded
    from localgemma.server.responses import WORDS, ResponsesRequest, responses_inputs

    _, fields = responses_inputs(ResponsesRequest(model=TWO_B, input="hi", max_output_tokens=0))
    with pytest.raises(InvalidInput) as info, worded(WORDS):
        parse_inputs(fields)
    assert info.value.message.startswith("max_output_tokens: Input should be greater than or equal to 1")
    with pytest.raises(Unsupported, match="text.verbosity: 'low' cannot be honoured"):
        responses_inputs(ResponsesRequest(model=TWO_B, input="hi", text={"verbosity": "low"}))


def test_only_requests_sure_to_prepare_quickly_are_prepared_by_the_event_loop(tmp_path):
    from localgemma.contract import parse_inputs
    from localgemma.runtime import QUICK_CHARS, Runtime

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    runtime = Runtime(exact=False)
    short = {"prompt": "Verse 1: la la la", "stream": True}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    quick = lambda fields, name=str(model): runtime.quick(name, parse_inputs(fields))  # noqa: E731
    assert not quick(short)  # not loaded yet: a load is seconds of blocking work
    runtime._engines[model.resolve()] = object()
    assert quick(short) and quick(chat) and quick({"prompt": "x" * QUICK_CHARS})
    assert not quick({"prompt": "x" * (QUICK_CHARS + 1)})  # long text: tokenizing it takes a while
    assert not quick({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * (QUICK_CHARS + 1)}]}]})
    assert not quick({"messages": [{"role": "user", "content": ""}] * 100})  # each turn adds the template's text
    assert not quick({**short, "lora": "style"})  # the finetune registry is on disk
    assert not quick({**short, "response_format": {"type": "json_object"}})  # a grammar to build
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert not quick({**chat, "tools": [tool]})
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                  "function": {"name": "f", "arguments": "{}"}}]}
    assert not quick({"messages": [{"role": "user", "content": "hi"}, call,
                                   {"role": "tool", "tool_call_id": "c", "content": "ok"}]})
    assert not quick(short, str(tmp_path / "missing.gguf")) and not quick(short, "@cf/google/gemma-7b-it-lora")
    assert not runtime.quick(str(model), {"prompt": "a dict, not yet validated"})
