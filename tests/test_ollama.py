"""Ollama's API end to end: the real `ollama` client (and raw HTTP where the wire itself is the
point) against a real `localgemma serve` on the embedded model, bound to the Workers AI id as in
tests/test_clients.py. Answers are checked against the Workers AI route's for the same inputs,
so the translation, not just the shape, is what is tested. The fast layer is in
tests/test_ollama_unit.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from datetime import datetime

import httpx
import pytest
from pydantic import BaseModel, Field
from servers import N_CTX, TWO_B, Server, home_with_model, wait_for

pytestmark = pytest.mark.e2e

NAME = "gemma-2b-it-lora"  # TWO_B's Ollama name
RAW = "The capital of France is"
GREEDY = {"temperature": 0, "num_predict": 8}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "London"]}},
                   "required": ["city"]}}}


def asked(city: str) -> list[dict]:
    """A question, the call it got, and the tool's answer: the history Ollama clients send back."""
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                             "arguments": {"city": city}}}]}
    return [{"role": "user", "content": f"Weather in {city}?"}, call,
            {"role": "tool", "content": "18C", "tool_name": "get_weather"}]


# The 270M base model will not choose a call from the tool preamble alone; two worked turns
# before the question make it answer with one (greedy, so every time), as a tool loop's
# history does.
TOOL_LOOP = [*asked("Tokyo"), *asked("London"), {"role": "user", "content": "Weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=1, le=99)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, embedded_gguf):
    home = tmp_path_factory.mktemp("ollama-home")
    home_with_model(home, embedded_gguf)
    server = Server(home, "--model", f"{TWO_B}={embedded_gguf}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(srv):
    import ollama

    return ollama.Client(host=srv.base)


def workers_ai(srv: Server, inputs: dict) -> dict:
    r = httpx.post(srv.url(), json=inputs, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def check_done(part, prompt_tokens: int, completion_tokens: int) -> None:
    """The last object: done, why, and Ollama's metrics (nanoseconds, token counts)."""
    assert part.done is True and part.done_reason in ("stop", "length")
    assert (part.prompt_eval_count, part.eval_count) == (prompt_tokens, completion_tokens)
    assert part.total_duration >= part.prompt_eval_duration + part.eval_duration > 0
    assert 0 <= part.load_duration < part.total_duration
    assert datetime.fromisoformat(part.created_at.replace("Z", "+00:00")).utcoffset().total_seconds() == 0


# -- generate and chat --------------------------------------------------------------------------

def test_generate_raw_and_templated_equal_the_workers_ai_route(srv, client):
    out = client.generate(model=NAME, prompt=RAW, raw=True, options=GREEDY)
    same = workers_ai(srv, {"prompt": RAW, "raw": True, "temperature": 0, "max_tokens": 8})
    assert out.response == same["response"] and out.response.strip()
    check_done(out, same["usage"]["prompt_tokens"], same["usage"]["completion_tokens"])
    assert out.done_reason == "length" and out.model == NAME
    # templated, with a system prompt: the contract's messages
    out = client.generate(model=f"{TWO_B}:latest", prompt="Name a colour.", system="Be brief.", options=GREEDY)
    same = workers_ai(srv, {"messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Name a colour."}], "temperature": 0,
                            "max_tokens": 8})
    assert out.response == same["response"] and out.model == f"{TWO_B}:latest"


def test_chat_whole_and_streamed_agree_token_by_token(srv, client):
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    whole = client.chat(model=NAME, messages=messages, options={"temperature": 0, "num_predict": 12})
    same = workers_ai(srv, {"messages": messages, "temperature": 0, "max_tokens": 12})
    assert whole.message.role == "assistant" and whole.message.content == same["response"]
    check_done(whole, same["usage"]["prompt_tokens"], 12)
    parts = list(client.chat(model=NAME, messages=messages, options={"temperature": 0, "num_predict": 12},
                             stream=True))
    assert len(parts) > 6 and all(not p.done for p in parts[:-1])  # a piece per token, then the done object
    assert "".join(p.message.content for p in parts) == whole.message.content
    check_done(parts[-1], same["usage"]["prompt_tokens"], 12)
    assert parts[-1].message.content == "" and parts[-1].done_reason == "length"


def test_the_stream_is_ndjson_by_default(srv):
    body = {"model": NAME, "prompt": RAW, "raw": True, "options": GREEDY}  # no "stream": Ollama's default is true
    with httpx.stream("POST", srv.base + "/api/generate", content=json.dumps(body), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        text = r.read().decode()
    lines = text.split("\n")
    assert lines[-1] == "" and all(lines[:-1])  # one object per line, newline-terminated, no blank lines
    objects = [json.loads(x) for x in lines[:-1]]
    assert len(objects) == 9 and objects[-1]["done"] is True and not any(o["done"] for o in objects[:-1])
    assert set(objects[0]) == {"model", "created_at", "response", "done"}
    assert {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
            "eval_duration", "done_reason"} <= set(objects[-1])
    whole = httpx.post(srv.base + "/api/generate", json={**body, "stream": False}, timeout=60)
    assert whole.headers["content-type"] == "application/json"
    assert whole.json()["response"] == "".join(o["response"] for o in objects)


def test_structured_output_with_a_pydantic_schema(client):
    out = client.chat(model=NAME, messages=[{"role": "user", "content": "A person as JSON."}],
                      format=Person.model_json_schema(), options={"temperature": 0, "num_predict": 60})
    person = Person.model_validate_json(out.message.content)
    assert 1 <= person.age <= 99
    # "json": any object (the weak base model needs an example to close one in time)
    out = client.generate(model=NAME, prompt='{"name": "Bob", "age": 41}\n{"name": "Alice", "age": 30}\n',
                          raw=True, format="json",
                          options={"temperature": 0, "num_predict": 60})
    assert isinstance(json.loads(out.response), dict) and out.done_reason == "stop"


def test_a_tool_call_comes_back_as_message_tool_calls(srv, client):
    out = client.chat(model=NAME, messages=TOOL_LOOP, tools=[WEATHER], options={"temperature": 0, "num_predict": 40})
    call = out.message.tool_calls[0]
    assert out.message.content == "" and out.done_reason == "stop"
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}  # an object
    raw = httpx.post(srv.base + "/api/chat", timeout=60, json={
        "model": NAME, "messages": TOOL_LOOP, "tools": [WEATHER], "stream": False,
        "options": {"temperature": 0, "num_predict": 40}}).json()["message"]["tool_calls"][0]
    assert raw["id"].startswith("call_") and raw["function"]["index"] == 0
    # streamed: the call in a done:false object of its own, never as text, then the done object
    parts = list(client.chat(model=NAME, messages=TOOL_LOOP, tools=[WEATHER], stream=True,
                             options={"temperature": 0, "num_predict": 40}))
    assert [bool(p.message.tool_calls) for p in parts] == [True, False] and not parts[0].done and parts[1].done
    assert parts[0].message.tool_calls[0].function.arguments == {"city": "Paris"}
    assert all(p.message.content == "" for p in parts)
    # and the result goes back as Ollama clients send it: the call, then a tool message
    follow = client.chat(model=NAME, tools=[WEATHER], options={"temperature": 0, "num_predict": 40}, messages=[
        TOOL_LOOP[-1], {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "18C, sunny", "tool_name": "get_weather"}])
    assert follow.message.content or follow.message.tool_calls


class Greeting(BaseModel):
    greeting: str = Field(max_length=20)


def test_format_beside_tools_gives_a_call_or_an_answer_in_the_format(client):
    """Ollama applies the format and drops every call (ollama/ollama#8095); here, as on /v1, a
    reply is a call, or else follows the format."""
    options = {"temperature": 0, "num_predict": 60}
    out = client.chat(model=NAME, messages=TOOL_LOOP, tools=[WEATHER], format=Greeting.model_json_schema(),
                      options=options)
    assert out.message.content == "" and out.message.tool_calls[0].function.arguments == {"city": "Paris"}
    # test_structured's case that answers (the same prompt, schema and seed as the contract's)
    messages = [{"role": "user", "content": "Write a greeting. Do not use any tool."}]
    options = {"temperature": 2, "top_k": 50, "seed": 1, "num_predict": 120}
    out = client.chat(model=NAME, messages=messages, tools=[WEATHER], format=Greeting.model_json_schema(),
                      options=options)
    assert not out.message.tool_calls and Greeting.model_validate_json(out.message.content).greeting
    parts = list(client.chat(model=NAME, messages=messages, tools=[WEATHER], format=Greeting.model_json_schema(),
                             options=options, stream=True))
    assert "".join(p.message.content for p in parts) == out.message.content and parts[-1].done
    import ollama

    for bad, said in (({"type": "object", "properties": [1]}, "$.properties: [1] is not of type 'object'"),
                      ({"type": "object", "minItems": -5}, "$.minItems: -5 is less than the minimum of 0")):
        with pytest.raises(ollama.ResponseError) as refused:  # a 400 naming the field, before generating
            client.chat(model=NAME, messages=messages, tools=[WEATHER], format=bad, options=options)
        assert refused.value.status_code == 400 and refused.value.error.startswith("format: not a valid JSON Schema")
        assert said in refused.value.error


def test_logprobs(client):
    out = client.generate(model=NAME, prompt=RAW, raw=True, options=GREEDY, logprobs=True, top_logprobs=2)
    assert "".join(e.token for e in out.logprobs) == out.response and len(out.logprobs) == out.eval_count
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in out.logprobs)
    streamed = [e.token for p in client.generate(model=NAME, prompt=RAW, raw=True, options=GREEDY, logprobs=True,
                                                 stream=True) for e in (p.logprobs or [])]
    assert streamed == [e.token for e in out.logprobs]


def test_an_empty_prompt_loads_the_model_and_answers_at_once(client):
    out = client.generate(model=NAME, prompt="")
    assert out.done and out.done_reason == "load" and out.response == ""
    out = client.chat(model=NAME, messages=[])
    assert out.done_reason == "load" and out.message.content == ""


# -- models --------------------------------------------------------------------------------------

def test_list_show_ps_and_version(srv, client, embedded_gguf):
    from localgemma.gguf_header import read_header

    listed = {m.model: m for m in client.list().models}
    assert {f"{NAME}:latest", "gemma-3-270m:latest"} <= set(listed)
    base = listed[f"{NAME}:latest"]
    assert base.size == embedded_gguf.stat().st_size and len(base.digest) == 64 and base.modified_at
    assert (base.details.format, base.details.family, base.details.quantization_level) == ("gguf", "gemma3", "Q4_K_M")
    assert base.details.parameter_size == "268.10M"  # what Ollama lists for gemma3:270m
    shown = client.show(NAME)
    header = read_header(embedded_gguf)
    info = shown.modelinfo
    assert info["general.architecture"] == "gemma3" and info["gemma3.context_length"] == header.get(
        "gemma3.context_length") and info["gemma3.block_count"] == header.get("gemma3.block_count")
    assert info["general.parameter_count"] == 268098176 and info["tokenizer.ggml.tokens"] is None
    assert shown.capabilities == ["completion", "tools"] and "<start_of_turn>" in shown.template
    assert "temperature" in shown.parameters and shown.modified_at and shown.details.family == "gemma3"
    verbose = httpx.post(srv.base + "/api/show", json={"model": NAME, "verbose": True}, timeout=60).json()
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 262144 and verbose["tensors"]
    running = {m.name: m for m in client.ps().models}
    assert running[f"{NAME}:latest"].context_length == N_CTX and running[f"{NAME}:latest"].expires_at
    r = httpx.get(srv.base + "/api/version")
    assert all(part.isdigit() for part in r.json()["version"].split("."))
    assert httpx.head(srv.base + "/api/version").status_code == 200 and httpx.head(srv.base + "/").status_code == 200
    assert httpx.get(srv.base + "/").headers["content-type"].startswith("text/html")  # still the playground


def test_a_finetune_runs_as_name_tag(srv, client, embedded_gguf, tmp_path):
    from peft_util import make_peft_adapter

    folder = make_peft_adapter(tmp_path / "peft", embedded_gguf, seed=11)
    r = srv.upload("ollama-style", folder)
    assert r.status_code == 200, r.text
    ident = r.json()["result"]["id"]
    listed = {m.model: m for m in client.list().models}
    assert listed[f"{NAME}:ollama-style"].details.parent_model == f"{NAME}:latest"
    base = client.generate(model=NAME, prompt=RAW, raw=True, options=GREEDY).response
    tuned = client.generate(model=f"{NAME}:ollama-style", prompt=RAW, raw=True, options=GREEDY).response
    same = workers_ai(srv, {"prompt": RAW, "raw": True, "temperature": 0, "max_tokens": 8, "lora": "ollama-style"})
    assert tuned == same["response"] and tuned != base
    assert client.chat(model=f"{TWO_B}:{ident}", messages=[{"role": "user", "content": RAW}], options=GREEDY).message
    shown = client.show(f"{NAME}:ollama-style")
    assert "ADAPTER ollama-style" in shown.modelfile and shown.details.parent_model == f"{NAME}:latest"


# -- errors ----------------------------------------------------------------------------------------

def test_errors_are_response_errors_with_ollamas_status(client):
    import ollama

    def error(call) -> ollama.ResponseError:
        with pytest.raises(ollama.ResponseError) as info:
            call()
        return info.value

    for call in (lambda: client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}]),
                 lambda: client.generate(model="llama3.2", prompt="hi", stream=True).__next__(),
                 lambda: client.show(f"{NAME}:no-such-finetune")):
        e = error(call)
        assert e.status_code == 404 and e.error.startswith('model "') and f"{NAME}:latest" in e.error, e.error
    e = error(lambda: client.generate(model=NAME, prompt="hi", options={"temperature": 7}))
    assert e.status_code == 400 and "options.temperature" in e.error and "7" in e.error and "0 to 5" in e.error
    e = error(lambda: client.generate(model=NAME, prompt="hi", options={"min_p": 0.05}))
    assert e.status_code == 400 and "options.min_p" in e.error
    e = error(lambda: client.generate(model=NAME, prompt="hi", think=True))
    assert e.status_code == 400 and "does not support thinking" in e.error
    e = error(lambda: client.chat(model=NAME, messages=[{"role": "user", "content": "hi", "images": [b"\x89PNG"]}]))
    assert e.status_code == 400 and "messages[0].images" in e.error
    e = error(lambda: client.pull(NAME))
    assert e.status_code == 501 and "localgemma models pull" in e.error
    e = error(lambda: client.create(model="mine", from_=NAME))
    assert e.status_code == 501 and "localgemma finetune create" in e.error
    assert error(lambda: client.embed(model=NAME, input="hi")).status_code == 501
    assert "localgemma finetune delete" in error(lambda: client.delete(f"{NAME}:x")).error
    # a prompt longer than the context: before the stream starts, so a status
    e = error(lambda: list(client.generate(model=NAME, prompt="la " * 400, raw=True, stream=True)))
    assert e.status_code == 400 and "context" in e.error


def test_a_stream_that_fails_after_it_started_ends_with_an_error_line(srv, client):
    import ollama

    # the JSON cannot be finished in 3 tokens: known only at the end, after text went out
    body = {"model": NAME, "prompt": "A person as JSON.", "format": Person.model_json_schema(),
            "options": {"temperature": 0, "num_predict": 3}}
    with httpx.stream("POST", srv.base + "/api/generate", json=body, timeout=60) as r:
        objects = [json.loads(x) for x in r.iter_lines()]
    assert r.status_code == 200 and objects[0]["response"] and objects[-1] == {"error": objects[-1]["error"]}
    assert "options.num_predict" in objects[-1]["error"]  # the request's words, not the contract's max_tokens
    with pytest.raises(ollama.ResponseError, match="options.num_predict"):
        list(client.generate(**{**body, "stream": True}))


# -- cancelling ----------------------------------------------------------------------------------

LONG = {"model": NAME, "prompt": "la la la la la la la la", "raw": True, "options": {"temperature": 0,
                                                                                      "num_predict": -1}}


def request(srv: Server, body: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("POST", "/api/generate", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn


def close(conn: http.client.HTTPConnection) -> float:
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    return time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable with the server's



def test_a_client_that_leaves_mid_stream_stops_its_generation(srv):
    seen = {j["id"] for j in srv.jobs()}
    conn = request(srv, LONG)
    response = conn.getresponse()
    lines = [json.loads(response.readline()) for _ in range(3)]
    assert not any(x["done"] for x in lines)  # -1: until the context is full, ~240 tokens
    closed_at = close(conn)
    job = wait_for(lambda: next((j for j in srv.jobs() if j["id"] not in seen and j["ended_at"]), None))
    assert job["state"] == "cancelled" and job["chunks_after_cancel"] <= 2, job
    assert job["chunks"] <= 3 + 2 + 4, job
    assert job["ended_at"] - closed_at < 1.0, job


def test_a_client_that_leaves_before_a_whole_answer_stops_it_too(srv):
    seen = {j["id"] for j in srv.jobs()}
    conn = request(srv, {**LONG, "stream": False})
    running = wait_for(lambda: next((j for j in srv.jobs() if j["id"] not in seen and j["chunks"] >= 3), None))
    closed_at = close(conn)
    job = wait_for(lambda: next((j for j in srv.jobs() if j["id"] == running["id"] and j["ended_at"]), None))
    assert job["state"] == "cancelled" and job["ended_at"] - closed_at < 1.0, job
    assert job["chunks"] < N_CTX // 2, job  # far from the ~240 tokens it would have made


def test_with_an_api_key_the_client_sends_it_as_ollama_api_key(tmp_path, monkeypatch):
    import ollama

    server = Server(tmp_path, "--api-key", "sekret", env={"LOCALGEMMA_PRELOAD": "0"})  # listing loads no model
    try:
        with pytest.raises(ollama.ResponseError) as info:
            ollama.Client(host=server.base).list()
        assert info.value.status_code == 401 and info.value.error == "Authentication error"
        monkeypatch.setenv("OLLAMA_API_KEY", "sekret")  # the client sends it as a bearer token
        assert "gemma-3-270m:latest" in {m.model for m in ollama.Client(host=server.base).list().models}
    finally:
        server.stop()
