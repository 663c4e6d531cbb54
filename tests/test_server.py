"""`localgemma serve` end to end: a real server process on a real socket, the embedded Gemma 3
270M behind it, and real clients (curl, requests, httpx, the openai package).

The main server binds the seeds' model ids to the embedded GGUF, so the seeds' curl commands
run with only the base URL changed; its context is 256 tokens (LOCALGEMMA_N_CTX) so that
their default 256-token answers are clamped and the file stays fast. A second server has an
API key, no waiting room (--max-queue 0) and a 16 KiB body limit. Both run with --exact (one
request at a time, answers exactly the solo ones: the stress and queue tests depend on it); a
third, batched server (--parallel 4, the default) is tested at the end of the file.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from servers import N_CTX, SEVEN_B, TWO_B, Server, wait_for

pytestmark = pytest.mark.e2e

SEED_LORA = "00000000-0000-0000-0000-000000000"  # the seed's placeholder; not a UUID, so a valid name
KEY = "sekret-key"
LONG = {"prompt": "la la la la la la la la", "raw": True, "temperature": 0, "max_tokens": 4000, "stream": True}


# -- servers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(_session_home, embedded_gguf):
    srv = Server(_session_home, "--model", f"{TWO_B}={embedded_gguf}", "--model", f"{SEVEN_B}={embedded_gguf}",
                 "--exact")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded(_session_home, embedded_gguf):
    srv = Server(_session_home, "--model", f"{TWO_B}={embedded_gguf}", "--api-key", KEY, "--max-queue", "0",
                 "--max-body-mb", str(16 / 1024), "--exact")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def adapters(server, embedded_gguf, tmp_path_factory):
    """Two finetunes uploaded over REST: the seed's placeholder name, and 'style-b'."""
    from peft_util import make_peft_adapter

    names = {}
    for name, seed in ((SEED_LORA, 3), ("style-b", 4)):
        folder = make_peft_adapter(tmp_path_factory.mktemp(f"peft-{seed}"), embedded_gguf, seed=seed,
                                   targets=("q_proj", "v_proj", "o_proj"))
        httpx.delete(server.finetunes(f"/{name}"))  # left over from an earlier run in this home
        r = server.upload(name, folder, description=f"seed {seed}")
        assert r.status_code == 200, r.text
        assert r.json()["result"]["status"] == "ready"
        names[name] = r.json()["result"]["id"]
    return names


def run(server, body, model=TWO_B, **kw):
    return httpx.post(server.url(model), json=body, timeout=60, **kw)


def text(server, body, model=TWO_B) -> str:
    r = run(server, {"temperature": 0, **body}, model)
    assert r.status_code == 200, r.text
    return r.json()["result"]["response"]


def sse_events(raw: bytes) -> list[str]:
    assert raw.endswith(b"\n\n") and b"\r" not in raw
    return [block.removeprefix("data: ") for block in raw.decode().split("\n\n")[:-1]]


# -- the seeds' examples, verbatim but for the base URL ------------------------------------------

@pytest.fixture
def curl(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")

    def call(*args: str) -> bytes:
        args = [a.replace("https://api.cloudflare.com", server.base) for a in args]
        env = {**os.environ, "CLOUDFLARE_ACCOUNT_ID": "acct", "CLOUDFLARE_AUTH_TOKEN": "token"}
        return subprocess.run(["curl", "-sS", *args], env=env, capture_output=True, check=True, timeout=60).stdout

    return call


def expand(url: str) -> str:
    return url.replace("$CLOUDFLARE_ACCOUNT_ID", "acct").replace("{ACCOUNT_ID}", "acct")


def test_seed_curl_messages(curl):
    out = json.loads(curl(expand("https://api.cloudflare.com/client/v4/accounts/$CLOUDFLARE_ACCOUNT_ID/ai/run/@cf/google/gemma-2b-it-lora"),
                          "-H", "Authorization: Bearer token", "-H", "Content-Type: application/json", "-d", """{
    "messages": [
      { "role": "system", "content": "You are a helpful assistant." },
      { "role": "user", "content": "Explain quantum entanglement in one sentence." }
    ]
  }"""))
    assert out["success"] is True and out["errors"] == [] and out["messages"] == []
    assert isinstance(out["result"]["response"], str) and out["result"]["usage"]["completion_tokens"] >= 1


def test_seed_curl_raw_string_true_and_lora(curl, server, adapters):
    out = json.loads(curl(expand("https://api.cloudflare.com/client/v4/accounts/$CLOUDFLARE_ACCOUNT_ID/ai/run/@cf/google/gemma-2b-it-lora"),
                          "-X", "POST", "-H", "Authorization: Bearer token", "-d", """{
"prompt": "tell me a story",
"raw": "true",
"lora": "00000000-0000-0000-0000-000000000"
}"""))
    assert out["success"] is True
    usage = out["result"]["usage"]
    # raw: the 5 prompt tokens are exactly <bos> + "tell me a story"; the 256 default is clamped to the context
    assert usage["prompt_tokens"] == 5 and usage["total_tokens"] == N_CTX


def test_seed_curl_streams(curl):
    raw = curl("-X", "POST", expand("https://api.cloudflare.com/client/v4/accounts/{ACCOUNT_ID}/ai/run/@cf/google/gemma-2b-it-lora"),
               "-H", "Authorization: Bearer {API_TOKEN}", "-H", "Content-Type:application/json",
               "-d", '{ "prompt": "where is new york?", "stream": true }')
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and "usage" in json.loads(events[-2])
    raw = curl(expand("https://api.cloudflare.com/client/v4/accounts/{ACCOUNT_ID}/ai/run/@cf/google/gemma-2b-it-lora"),
               "-X", "POST", "-H", "Authorization: Bearer {API_TOKEN}",
               "-d", '{ "stream": true, "messages": [{ "role": "system", "content": "You are a friendly assistant" }, '
                     '{ "role": "user", "content": "Why is pizza so good?" }]}')
    assert sse_events(raw)[-1] == "[DONE]"


def test_seed_python_requests_7b(server):
    import requests

    response = requests.post(
        f"{server.base}/client/v4/accounts/acct/ai/run/@cf/google/gemma-7b-it-lora",
        headers={"Authorization": "Bearer token"},
        json={"messages": [{"role": "system", "content": "You are a friendly assistant"},
                           {"role": "user", "content": "Tell me all about PEP-8"}]})
    result = response.json()
    assert result["success"] and result["result"]["response"]


# -- envelope and SSE bytes --------------------------------------------------------------------

EVENT = r'data: \{"response":"(?:[^"\\]|\\.)*"\}\n\n'
LAST = r'data: \{"response":"","usage":\{"prompt_tokens":\d+,"completion_tokens":\d+,"total_tokens":\d+\}\}\n\n'


def test_sse_bytes_are_exactly_workers_ai_events(server):
    body = {"prompt": "The three most important inventions are", "raw": True, "temperature": 0, "max_tokens": 12}
    r = run(server, {**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert re.fullmatch(f"(?:{EVENT})+{LAST}data: \\[DONE\\]\n\n", r.text), r.text
    assert not any(line.startswith(":") for line in r.text.split("\n"))  # no ping comments
    events = [json.loads(e) for e in sse_events(r.content)[:-1]]
    whole = run(server, body).json()
    assert whole == {"result": {"response": "".join(e["response"] for e in events), "usage": events[-1]["usage"]},
                     "success": True, "errors": [], "messages": []}


def test_prompt_messages_and_embedded_id(server):
    assert text(server, {"prompt": "hi", "max_tokens": 3}, model="@localgemma/google/gemma-3-270m")
    assert text(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})


# -- errors ------------------------------------------------------------------------------------

def error_of(r, status: int, code: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["result"] == {} and body["messages"] == []
    assert body["errors"][0]["code"] == code, body
    return body["errors"][0]["message"]


def test_unknown_model_400_5007(server):
    assert "@cf/meta/nope" in error_of(run(server, {"prompt": "hi"}, model="@cf/meta/nope"), 400, 5007)


def test_local_paths_are_not_models_over_http(server, embedded_gguf):
    error_of(run(server, {"prompt": "hi"}, model=str(embedded_gguf).lstrip("/")), 400, 5007)


def test_malformed_json_400(server):
    r = httpx.post(server.url(), content=b'{"prompt": "hi",', timeout=10)
    assert "malformed JSON" in error_of(r, 400, 5004)
    assert "empty" in error_of(httpx.post(server.url(), content=b"", timeout=10), 400, 3003)


def test_invalid_field_names_field_and_value(server):
    message = error_of(run(server, {"prompt": "hi", "temperature": 7}), 400, 3010)
    assert "temperature" in message and "7" in message


def test_stream_failing_before_first_token_is_plain_json(server):
    r = run(server, {"prompt": "hi", "stream": True, "lora": "no-such-adapter"})
    assert r.headers["content-type"].startswith("application/json")
    assert "no-such-adapter" in error_of(r, 404, 3037)
    r = run(server, {"prompt": "word " * 300, "raw": True, "stream": True})  # longer than the 256-token context
    assert "context" in error_of(r, 400, 5004)


def test_unknown_route(server):
    error_of(httpx.get(server.base + "/client/v4/nope"), 404, 7000)


def test_max_tokens_clamped_to_context(server):
    body = {"prompt": "word " * 240, "raw": True, "temperature": 0, "max_tokens": 1000}
    usage = run(server, body).json()["result"]["usage"]
    assert usage["total_tokens"] == N_CTX and usage["completion_tokens"] < 20


# -- finetunes over REST -----------------------------------------------------------------------

def test_finetune_list_and_lora_by_name_or_id(server, adapters):
    listed = {e["name"]: e for e in httpx.get(server.finetunes()).json()["result"]}
    for name, ident in adapters.items():
        assert listed[name]["id"] == ident and listed[name]["model"] == TWO_B and "description" in listed[name]
        assert "adapter_path" not in listed[name]
    prompt = {"prompt": "The capital of France is", "raw": True, "max_tokens": 8}
    base = text(server, prompt)
    by_name = text(server, {**prompt, "lora": "style-b"})
    assert by_name == text(server, {**prompt, "lora": adapters["style-b"]}) and by_name != base
    assert text(server, {**prompt, "lora": SEED_LORA}) not in (base, by_name)


def test_finetune_pending_until_both_files_then_delete(server, embedded_gguf, tmp_path):
    from peft_util import make_peft_adapter

    folder = make_peft_adapter(tmp_path, embedded_gguf, seed=9)
    httpx.delete(server.finetunes("/tmp-ft"))
    r = httpx.post(server.finetunes(), content=json.dumps({"model": TWO_B, "name": "tmp-ft"}))  # no Content-Type
    ident = r.json()["result"]["id"]
    assert r.json()["result"]["status"] == "pending"
    upload = httpx.post(server.finetunes(f"/{ident}/finetune-assets"), data={"file_name": "adapter_config.json"},
                        files={"file": ("c", (folder / "adapter_config.json").read_bytes())})
    assert upload.json()["result"]["files"] == ["adapter_config.json"]
    assert "adapter_model.safetensors" in error_of(run(server, {"prompt": "hi", "lora": "tmp-ft"}), 400, 3039)
    error_of(httpx.post(server.finetunes(f"/{ident}/finetune-assets"), data={"file_name": "adapter_config.json"}),
             400, 3003)  # the file part is missing
    assert httpx.delete(server.finetunes(f"/{ident}")).json()["result"]["id"] == ident
    error_of(httpx.get(server.finetunes("/tmp-ft")), 404, 3037)
    error_of(httpx.post(server.finetunes(), json={"model": "@cf/nope", "name": "x"}), 400, 5007)
    assert "nam" in error_of(httpx.post(server.finetunes(), json={"model": TWO_B, "nam": "x"}), 400, 3010)


# -- operations: auth, limits, queue, health ---------------------------------------------------

def test_health_was_503_while_loading_then_200(server):
    statuses = [status for status, _ in server.health_seen]
    assert statuses[-1] == 200 and server.health_seen[-1][1]["models"] == {TWO_B: "ready", SEVEN_B: "ready"}
    assert all(s == 503 for s in statuses[:-1])
    assert any(body["status"] == "loading" for status, body in server.health_seen if status == 503), \
        "the first /health answer came after loading finished (machine too fast to see 503)"


def test_auth(guarded):
    assert httpx.get(guarded.base + "/health").status_code == 200  # open
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(guarded.url(), json=body, headers=headers)
        assert error_of(r, 401, 10000) == "Authentication error"
    assert httpx.post(guarded.url(), json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = httpx.get(guarded.base + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # what a browser loads before it can send a key is open: the page (it asks) and the docs
    for path in ("/", "/docs", "/openapi.json", "/playground/app.js"):
        assert httpx.get(guarded.base + path).status_code == 200, path
    assert httpx.get(guarded.base + "/client/v4/accounts/x/ai/finetunes").status_code == 401


def test_body_limit_413(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    big = json.dumps({"prompt": "x" * 20000}).encode()
    assert "too large" in error_of(httpx.post(guarded.url(), content=big, headers=auth), 413, 3006)

    def chunked():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    error_of(httpx.post(guarded.url(), content=chunked(), headers=auth), 413, 3006)
    r = httpx.post(guarded.base + "/v1/completions", content=big, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "3006"


class Stream:
    """A streaming request on its own connection, read event by event, closed at will."""

    def __init__(self, srv: Server, body: dict, headers: dict | None = None, wait: bool = True):
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        self.conn.request("POST", srv.url().removeprefix(srv.base), body=json.dumps(body),
                          headers={"Content-Type": "application/json", **(headers or {})})
        self.response = self.conn.getresponse() if wait else None

    def events(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            line = self.response.readline().decode()
            if line.startswith("data: "):
                out.append(line[6:].strip())
        return out

    def close(self) -> float:
        self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        return time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable with the server's



def test_queue_full_is_429_at_once(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    busy = Stream(guarded, LONG, auth)
    busy.events(1)
    start = time.monotonic()
    r = httpx.post(guarded.url(), json={"prompt": "hi", "max_tokens": 2}, headers=auth)
    assert "busy" in error_of(r, 429, 3040) and time.monotonic() - start < 2
    r = httpx.post(guarded.base + "/v1/completions", headers=auth, json={"model": TWO_B, "prompt": "hi"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    busy.close()
    wait_for(lambda: run(guarded, {"prompt": "hi", "max_tokens": 2}, headers=auth).status_code == 200)


def test_disconnect_stops_generation_within_a_token(server):
    seen = {j["id"] for j in server.jobs()}
    stream = Stream(server, LONG)
    stream.events(3)
    closed_at = stream.close()
    job = wait_for(lambda: next((j for j in server.jobs() if j["id"] not in seen and j["ended_at"]), None))
    assert job["state"] == "cancelled" and job["chunks_after_cancel"] <= 2, job
    assert job["chunks"] <= 3 + 2 + 4, job  # 3 read, maybe 2 in flight; the context would allow ~250
    assert job["ended_at"] - closed_at < 1.0, job  # the engine was free again within a second


def test_disconnect_while_queued_leaves_the_line(server):
    seen = {j["id"] for j in server.jobs()}
    first = Stream(server, LONG)
    first.events(1)
    queued = Stream(server, {**LONG, "prompt": "queued"}, wait=False)
    waiting = wait_for(lambda: next((j for j in server.jobs() if j["id"] not in seen and j["state"] == "waiting"), None))
    queued.close()
    gone = wait_for(lambda: next((j for j in server.jobs() if j["id"] == waiting["id"] and j["ended_at"]), None))
    assert gone["state"] == "cancelled" and gone["started_at"] is None and gone["chunks"] == 0
    first.close()


def test_mixed_adapter_stress_equals_each_alone(server, adapters):
    requests_ = [{"prompt": p, "raw": True, "max_tokens": 8, **({"lora": lora} if lora else {})}
                 for p in ("Once upon a time", "The capital of France is", "def main():")
                 for lora in (None, "style-b", SEED_LORA)]
    alone = [text(server, body) for body in requests_]
    jobs = [body for _ in range(2) for body in requests_]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda body: text(server, body), jobs))
    assert together == alone * 2
    assert len(set(alone)) > len(requests_) // 2  # the adapters really change the answers


# -- OpenAI shim through the openai package ----------------------------------------------------

@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def test_openai_models_lists_bases_and_adapters(client, adapters):
    ids = {m.id for m in client.models.list()}
    assert {TWO_B, SEVEN_B, f"{TWO_B}:style-b", f"{TWO_B}:{SEED_LORA}"} <= ids


def test_openai_chat_stream_equals_whole(client, server):
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=TWO_B, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=TWO_B, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.choices[0].finish_reason == ("length" if whole.usage.completion_tokens == 10 else "stop")
    as_workers = text(server, {"messages": [{"role": "system", "content": "Be brief."}, messages[1]], "max_tokens": 10})
    assert whole.choices[0].message.content == as_workers


def test_openai_completion_is_raw_and_adapter_selectable(client, server, adapters):
    prompt = "The capital of France is"
    out = client.completions.create(model=f"{TWO_B}:style-b", prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == text(server, {"prompt": prompt, "raw": True, "max_tokens": 8, "lora": "style-b"})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    streamed = client.completions.create(model=TWO_B, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text(server, {"prompt": prompt, "raw": True, "max_tokens": 8})


def test_openai_tool_calls_whole_and_streamed(client):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "description": "the city"}}, "required": ["city"]}}}
    ask = dict(model=TWO_B, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool],
               tool_choice="required", temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**ask).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    call = whole.message.tool_calls[0].function
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert not any(c.choices[0].delta.content for c in chunks)  # the call's JSON is not also sent as text
    streamed = [c.choices[0].delta.tool_calls[0].function for c in chunks if c.choices[0].delta.tool_calls]
    assert [(f.name, f.arguments) for f in streamed] == [(call.name, call.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}


def test_structured_output_on_both_surfaces(server, client):
    import jsonschema

    ask = [{"role": "user", "content": "A person as JSON."}]
    r = run(server, {"messages": ask, "temperature": 0, "max_tokens": 60,
                     "response_format": {"type": "json_schema", "json_schema": PERSON}})
    assert r.status_code == 200, r.text
    jsonschema.validate(r.json()["result"]["response"], PERSON)  # a JSON value in the envelope
    out = client.chat.completions.create(model=TWO_B, messages=ask, temperature=0, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert json.loads(out.choices[0].message.content) == r.json()["result"]["response"]  # OpenAI: a JSON string
    bad = run(server, {"messages": ask, "response_format": {"type": "json_schema",
                                                             "json_schema": {"type": "number", "minimum": 0.5}}})
    assert "$: minimum" in error_of(bad, 400, 3010)


def test_openai_tool_round_trip_and_named_choice(client):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
    add = {"type": "function", "function": {"name": "add", "description": "Add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    named = client.chat.completions.create(model=TWO_B, messages=ask, tools=[tool, add], temperature=0, max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "add"}})
    assert named.choices[0].message.tool_calls[0].function.name == "add"
    first = client.chat.completions.create(model=TWO_B, messages=ask, tools=[tool], tool_choice="required",
                                           temperature=0, max_tokens=60).choices[0].message
    history = ask + [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "18C and sunny"}]
    answers = set()
    for result in ("18C and sunny", "-5C, heavy snow"):
        history[-1]["content"] = result
        reply = client.chat.completions.create(model=TWO_B, messages=history, tools=[tool], tool_choice="none",
                                               temperature=0, max_tokens=24).choices[0]
        assert reply.finish_reason in ("stop", "length") and isinstance(reply.message.content, str)
        answers.add(reply.message.content)
    assert len(answers) == 2  # the tool's result reaches the model's next turn


@pytest.mark.parametrize("params, param", [
    ({"n": 2}, "n"), ({"stop": ["1", "2", "3", "4", "5"]}, "stop"), ({"presence_penalty": -0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"1": 5}}, "logit_bias"), ({"temperature": 9}, "temperature"),
    ({"extra_body": {"best_of_n": 1}}, "best_of_n"),
])
def test_openai_refuses_what_it_cannot_honour(client, params, param):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=TWO_B, messages=[{"role": "user", "content": "hi"}], **params)
    assert err.value.param == param and param in err.value.message


def test_openai_errors(client, guarded):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="@cf/nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=f"{TWO_B}:no-such-adapter", prompt="hi")
    wrong = openai.OpenAI(base_url=guarded.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=guarded.base + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in right.models.list()][0] == TWO_B


# -- the command ---------------------------------------------------------------------------------

def test_serve_command_refuses_bad_model_flags(tmp_path):
    from click.testing import CliRunner

    from localgemma.server.cli import serve

    runner = CliRunner()
    result = runner.invoke(serve, ["--model", "no-equals-sign"])
    assert result.exit_code == 2 and "ID=PATH" in result.output
    result = runner.invoke(serve, ["--model", f"@cf/x={tmp_path / 'missing.gguf'}"])
    assert result.exit_code == 2 and "missing.gguf" in result.output
    assert "--max-queue" in runner.invoke(serve, ["--help"]).output


# -- a batched server (--parallel) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def batched(_session_home, embedded_gguf):
    srv = Server(_session_home, "--model", f"{TWO_B}={embedded_gguf}", "--parallel", "3", "--max-queue", "1",
                 "--batch-ctx", "1024")
    yield srv
    srv.stop()


def test_batched_streams_run_together_queue_and_429(batched):
    seen = {j["id"] for j in batched.jobs()}
    streams = [Stream(batched, {**LONG, "prompt": f"la {i} la"}) for i in range(3)]
    for s in streams:
        s.events(2)  # all three are generating at once
    running = [j for j in batched.jobs() if j["id"] not in seen and j["state"] == "running"]
    assert len(running) == 3
    queued = Stream(batched, {**LONG, "prompt": "queued"}, wait=False)  # slots 3 + queue 1 = 4 admitted
    wait_for(lambda: any(j["state"] == "waiting" for j in batched.jobs() if j["id"] not in seen))
    r = httpx.post(batched.url(), json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 429 and "3 requests generating and 1 waiting" in r.text
    closed_at = streams[0].close()  # cancelled mid-batch: its sequence is freed, the queued one runs
    job = wait_for(lambda: next((j for j in batched.jobs() if j["id"] == running[0]["id"] and j["ended_at"]), None))
    assert job["state"] == "cancelled" and job["ended_at"] - closed_at < 1.0, job
    queued.response = queued.conn.getresponse()
    assert queued.events(2)
    others = streams[1].events(5)  # the others kept going
    assert len(others) == 5
    for s in (*streams[1:], queued):
        s.close()


def test_batched_seeded_requests_equal_the_exact_server(batched, server):
    seeded = {"prompt": "Tell me a story", "temperature": 0.9, "seed": 7, "max_tokens": 12}
    alone = text(server, seeded)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda body: text(batched, body), [seeded, {"prompt": "Hi there"}] * 2))
    assert got[0] == got[2] == alone
    assert all(isinstance(g, str) and g for g in got[1::2])


def test_batched_stream_and_openai_work(batched):
    body = {"prompt": "The capital of France is", "raw": True, "temperature": 0, "max_tokens": 16}
    whole = text(batched, body)  # alone in the batch both times: the same steps, the same answer
    r = run(batched, {**body, "stream": True})
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["response"] for e in events[:-1]) == whole
