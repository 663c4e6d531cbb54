"""Generated hostile requests against every route of a real `localgemma serve`.

Each request is built by hypothesis (seeded, so a failure replays) from the contract's own
field names mixed with junk: wrong types, NaN-ish strings, huge and negative numbers, deep
nesting, odd content types and methods, unknown paths. Every answer must be below 500, on a
connection that stays usable; a foreign Origin on a request that acts, or a Host the server
does not answer to, is always 403; every Workers AI answer must be Cloudflare's envelope (or its
SSE stream); every /v1 error OpenAI's shape; every /api answer Ollama's (`{"error": str}`, or NDJSON
lines ending in a done or an error object); and the server must be healthy afterwards.

The default run (1000 requests) takes about a minute. LOCALGEMMA_FUZZ_EXAMPLES=20000 runs more;
the counts are printed at the end (pytest -s shows them).
"""

from __future__ import annotations

import collections
import json
import os
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from servers import TWO_B, Server, home_with_model

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("LOCALGEMMA_FUZZ_EXAMPLES", 1000))  # ~1000 take about a minute here
FIELDS = ["prompt", "messages", "raw", "stream", "max_tokens", "temperature", "top_p", "top_k", "seed",
          "repetition_penalty", "frequency_penalty", "presence_penalty", "response_format", "tools",
          "functions", "tool_choice", "lora", "image", "stop", "model", "n", "logprobs", "top_logprobs",
          "max_completion_tokens", "stream_options", "name", "description", "public", "role", "content",
          "type", "json_schema", "function", "parameters", "properties", "required", "enum", "anyOf",
          "maxLength", "minimum", "pattern", "items", "file_name"]
OLLAMA_FIELDS = ["model", "prompt", "messages", "system", "raw", "stream", "format", "options", "think", "keep_alive",
                 "images", "suffix", "template", "context", "tools", "logprobs", "top_logprobs", "truncate", "shift"]
OLLAMA_OPTIONS = ["num_predict", "temperature", "top_k", "top_p", "seed", "repeat_penalty", "presence_penalty",
                  "frequency_penalty", "stop", "min_p", "typical_p", "mirostat", "repeat_last_n", "penalize_newline",
                  "num_ctx", "num_thread", "use_mmap", "tfs_z", "mirostat_eta"]
OLLAMA_MODELS = ["gemma-2b-it-lora", "gemma-2b-it-lora:latest", f"{TWO_B}:latest", "gemma-3-270m",
                 "gemma-2b-it-lora:nope", "gemma-7b-it-lora", "nope", "", "a:b:c", "x" * 300]
NOT_OFFERED = {"/api/pull", "/api/delete", "/api/embed"}
MODELS = [TWO_B, "@cf/google/gemma-7b-it-lora", "@localgemma/google/gemma-3-270m", "nope", "../../etc/passwd",
          f"{TWO_B}:nope", "", "%00", "a" * 300]


def scalars():
    return st.one_of(
        st.none(), st.booleans(),
        st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([0, 1, 2, 3, 4, 8, 50, 51, -1, 10**12]),
        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e-39, 1e-40, 1e308, -0.0, 5.000001]),
        st.text(max_size=40), st.sampled_from(["nan", "inf", "good:nan", "<start_of_turn>", "\x00", "é" * 10, "{"]),
    )


def json_values():
    return st.recursive(scalars(), lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner, max_size=5)), max_leaves=12)


def small_generation():
    """Mostly fields that keep a generation short, so many requests fit in the budget."""
    return st.fixed_dictionaries({"max_tokens": st.one_of(st.integers(1, 3), scalars())},
                                 optional={k: json_values() for k in FIELDS[:24] if k != "max_tokens"})


EDGES = st.one_of(scalars(), st.sampled_from([
    0, 1, 5, 5.0001, 2, 2.0001, 50, 51, 9999999999, 10000000000, -1, 1e-39, True, "0.5", [], {},
    {"type": "json_object"}, {"type": "json_schema", "json_schema": {"type": "string", "maxLength": 100000}},
    {"type": "json_schema", "json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
    {"type": "json_schema", "json_schema": {"enum": []}}, [{"name": "f", "parameters": {"type": "object"}}],
    [{"type": "function", "function": {"name": "f", "strict": True}}], "required", "none", "good:nan", "x:0.5,y",
    ["stop"], "<end_of_turn>"]))
VALID = {  # per API: a request that generates a token or two
    "workers": [{"prompt": "Hi", "max_tokens": 2}, {"prompt": "Hi", "raw": True, "max_tokens": 1, "stream": True},
                {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}],
    "chat": [{"model": TWO_B, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
             {"model": TWO_B, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}],
    "completions": [{"model": TWO_B, "prompt": "Hi", "max_tokens": 2, "stream": True},
                    {"model": TWO_B, "prompt": "Hi", "max_tokens": 1}],
    "ollama_generate": [{"model": "gemma-2b-it-lora", "prompt": "Hi", "options": {"num_predict": 2}},
                        {"model": "gemma-2b-it-lora", "prompt": "Hi", "raw": True, "stream": False,
                         "options": {"num_predict": 1}}],
    "ollama_chat": [{"model": "gemma-2b-it-lora:latest", "messages": [{"role": "user", "content": "Hi"}],
                     "options": {"num_predict": 2}, "stream": False},
                    {"model": "gemma-2b-it-lora", "messages": [{"role": "user", "content": "Hi"}],
                     "options": {"num_predict": 2}}],
}


IN_RANGE = {  # the contract's edges, all valid: these requests generate
    "temperature": [0, 1e-39, 1e-7, 0.6, 5], "top_p": [0, 1e-9, 1, 2], "top_k": [1, 50], "seed": [1, 2**32, 9999999999],
    "repetition_penalty": [0, 1e-40, 1, 2], "frequency_penalty": [0, 2], "presence_penalty": [0, 2],
    "stream": [True, False], "raw": [True, False],
    "response_format": [{"type": "json_object"}, {"type": "json_schema", "json_schema": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}}],
}


def near_valid(api: str):
    """A request that would generate, with a few contract fields set to edge or junk values."""
    if api.startswith("ollama"):
        return near_valid_ollama(api)
    valid = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in IN_RANGE.items()})
    junk = st.dictionaries(st.sampled_from(FIELDS[2:24]), EDGES, max_size=3)
    return st.builds(lambda base, extra: json.dumps({**base, **extra}), st.sampled_from(VALID[api]),
                     st.one_of(valid, valid, junk))


def near_valid_ollama(api: str):
    """An Ollama request that would generate, with options (or top-level fields, or the model
    name) set to edge or junk values."""
    options = st.dictionaries(st.sampled_from(OLLAMA_OPTIONS), EDGES, max_size=3)
    extra = st.one_of(st.just({}), st.dictionaries(st.sampled_from(OLLAMA_FIELDS), EDGES, max_size=2),
                      st.fixed_dictionaries({"model": st.sampled_from(OLLAMA_MODELS)}))
    return st.builds(lambda base, opts, more: json.dumps({**base, "options": {**base["options"], **opts}, **more}),
                     st.sampled_from(VALID[api]), options, extra)


def bodies(api: str):
    deep = st.integers(200, 5000).map(lambda n: "[" * n + "]" * n)
    return st.one_of(
        near_valid(api), near_valid(api), near_valid(api),
        small_generation().map(json.dumps),
        json_values().map(lambda v: json.dumps(v)),
        st.builds(lambda p, extra: json.dumps({"prompt": p, "max_tokens": 2, **extra}), st.text(max_size=30),
                  st.dictionaries(st.sampled_from(FIELDS), json_values(), max_size=3)),
        deep, st.sampled_from(["", "{", "NaN", '{"prompt": NaN}', "null", "[]", '{"prompt": "x", "max_tokens": 1e400}']),
        st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    )


ROUTES = [
    ("POST", "/client/v4/accounts/a/ai/run/{model}"), ("POST", "/client/v4/accounts/a/ai/run/{model}"),
    ("GET", "/client/v4/accounts/a/ai/finetunes"),
    ("POST", "/client/v4/accounts/a/ai/finetunes"),
    ("GET", "/client/v4/accounts/a/ai/finetunes/{name}"),
    ("DELETE", "/client/v4/accounts/a/ai/finetunes/{name}"),
    ("POST", "/client/v4/accounts/a/ai/finetunes/{name}/finetune-assets"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"), ("GET", "/health"), ("PUT", "/v1/chat/completions"), ("GET", "/{name}"),
    ("POST", "/api/generate"), ("POST", "/api/generate"), ("POST", "/api/chat"), ("POST", "/api/chat"),
    ("GET", "/api/tags"), ("POST", "/api/show"), ("GET", "/api/ps"), ("GET", "/api/version"), ("POST", "/api/pull"),
    ("DELETE", "/api/delete"), ("POST", "/api/embed"), ("GET", "/api/{name}"),
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, embedded_gguf):
    home = tmp_path_factory.mktemp("fuzz-home")
    home_with_model(home, embedded_gguf)
    server = Server(home, "--model", f"{TWO_B}={embedded_gguf}", "--max-queue", "64")
    yield server
    server.stop()


def check(r: httpx.Response) -> str:
    route = r.request.url.path  # as sent: httpx resolves "../" itself
    # 501 only where it is the answer by design: Ollama endpoints with no equivalent here
    assert r.status_code < 500 or (r.status_code == 501 and route in NOT_OFFERED), (route, r.status_code, r.text[:500])
    kind = r.headers.get("content-type", "")
    if route.startswith("/api/") and "application/x-ndjson" in kind:
        lines = r.text.split("\n")
        assert lines[-1] == "" and all(lines[:-1]), r.text[-300:]  # one object per line, no blank lines
        objects = [json.loads(x) for x in lines[:-1]]
        assert objects[-1].get("done") is True or set(objects[-1]) == {"error"}, objects[-1]
        assert all(o.get("done") is False for o in objects[:-1]), r.text[-300:]
    elif route.startswith("/api/") and r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body  # Ollama's shape
    elif route.startswith("/api/"):
        assert isinstance(r.json(), dict) or r.request.method == "HEAD", r.text[:300]
    elif route.startswith("/client/v4") and "text/event-stream" in kind:
        events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
        assert events and (events[-1] == "[DONE]" or "errors" in events[-1]), r.text[-300:]
        for data in events[:-1]:
            json.loads(data)
    elif route.startswith("/client/v4") or (not route.startswith("/v1") and r.status_code >= 400):
        body = r.json()
        assert set(body) == {"result", "success", "errors", "messages"}, body
        assert body["success"] is (r.status_code < 400)
        if r.status_code >= 400:
            assert body["errors"] and body["errors"][0]["message"] and isinstance(body["errors"][0]["code"], int)
    elif route.startswith("/v1") and r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and error["type"], error
    return f"{r.status_code}"


def test_hostile_requests_never_5xx_or_drop_the_connection(srv):
    counts: collections.Counter = collections.Counter()
    started = time.monotonic()
    client = httpx.Client(base_url=srv.base, timeout=120)

    @seed(20261121)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(ROUTES), data=st.data(), model=st.one_of(st.just(TWO_B), st.sampled_from(MODELS)),
           name=st.sampled_from(["good", "nope", "..", "a" * 70, "%2e%2e", "x y"]),
           content_type=st.sampled_from(["application/json", "text/plain", "multipart/form-data",
                                         "application/x-www-form-urlencoded", None]),
           origin=st.sampled_from([None] * 40 + ["http://evil.example", "null", "http://127.0.0.1:1", "\x7f"]),
           host=st.sampled_from([None] * 40 + ["evil.example", "", "localhost", "[::1]:1", "127.0.0.1.evil.example"]))
    def one(route, data, model, name, content_type, origin, host):
        method, template = route
        api = "chat" if "chat" in template else "completions" if "completions" in template else "workers"
        if template.startswith("/api/"):
            api = "ollama_chat" if "chat" in template else "ollama_generate"
        body = data.draw(bodies(api))
        path = template.format(model=model, name=name)
        headers = {"Content-Type": content_type} if content_type else {}
        if origin is not None:
            headers["Origin"] = origin
        if host is not None:
            headers["Host"] = host
        content = body.encode("utf-8", "surrogatepass") if method in ("POST", "PUT") else None
        r = client.request(method, path, content=content, headers=headers)
        foreign_host = host is not None and host.rsplit(":", 1)[0].strip("[]") not in ("localhost", "::1")
        if foreign_host or (origin is not None and method not in ("GET", "HEAD")):
            assert r.status_code == 403, (method, path, origin, host, r.status_code)  # before anything ran
        counts[f"{method} {template} -> {check(r)}"] += 1

    one()
    client.close()
    assert srv.healthy(), srv.output()[-2000:]
    total = sum(counts.values())
    print(f"\nfuzz: {total} requests in {time.monotonic() - started:.0f} s")
    for key, n in sorted(counts.items()):
        print(f"  {n:5}  {key}")
    assert total >= 50
