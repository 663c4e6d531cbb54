"""No request, file or web page can crash, freeze or corrupt the server (issue: hardening).

One test per reproduced attack, at the level a user meets it: HTTP against a real
`localgemma serve` for the server items, the real CLI for the CLI items. Each asserts the
clear error (field, value, what is allowed), that nothing stored changed, and that the server
still answers. The fuzz test is tests/test_fuzz.py.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hostile import patched
from peft_util import make_peft_adapter
from servers import TWO_B, Server, home_with_model

pytestmark = pytest.mark.e2e

OBJECT = {"type": "json_schema", "json_schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                  "required": ["n"]}}
ASK = [{"role": "user", "content": "A number as JSON"}]
TOOL = {"type": "function", "function": {"name": "pick", "description": "pick a number", "parameters": {
    "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, embedded_gguf):
    """A batched server (the default) with short body/head timeouts and a small connection cap."""
    home = tmp_path_factory.mktemp("hardening-home")
    home_with_model(home, embedded_gguf)
    server = Server(home, "--model", f"{TWO_B}={embedded_gguf}", "--max-connections", "40",
                    env={"LOCALGEMMA_HEADER_TIMEOUT": "1", "LOCALGEMMA_BODY_TIMEOUT": "1"})
    server.home = home
    yield server
    server.stop()


def error_of(r: httpx.Response, status: int, code: int | None = None) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    if "errors" in body:
        assert body["success"] is False and body["result"] == {}
        if code is not None:
            assert body["errors"][0]["code"] == code, body
        return body["errors"][0]["message"]
    return body["error"]["message"]


def listing(srv) -> list:
    r = httpx.get(srv.finetunes())
    assert r.status_code == 200, r.text
    return r.json()["result"]


# -- 1. scores that overflow never break the grammar --------------------------------------------

@pytest.mark.parametrize("extra", [
    {"temperature": 1e-39}, {"temperature": 1e-30},
    {"repetition_penalty": 1e-40, "temperature": 1, "seed": 3},
    {"repetition_penalty": 1e-40, "temperature": 1e-39},
], ids=["temp 1e-39", "temp 1e-30", "penalty 1e-40", "both"])
def test_extreme_sampling_with_a_grammar_keeps_the_server_alive(srv, extra):
    """Valid output, or (a penalty that rewards repeating every token) JSON that never ends
    within max_tokens, said so; never a dead server."""
    def valid_or_unfinished(r: httpx.Response, value):
        if r.status_code == 200:
            return value(r.json())
        assert r.status_code == 400 and "raise max_tokens" in r.text, r.text
        return True

    body = {"messages": ASK, "response_format": OBJECT, "max_tokens": 24, **extra}
    r = httpx.post(srv.url(), json=body, timeout=120)
    assert valid_or_unfinished(r, lambda b: isinstance(b["result"]["response"]["n"], int))
    tools = {"messages": ASK, "tools": [TOOL], "tool_choice": "required", "max_tokens": 64, **extra}
    r = httpx.post(srv.url(), json=tools, timeout=120)
    assert valid_or_unfinished(r, lambda b: b["result"]["tool_calls"][0]["name"] == "pick")
    r = httpx.post(srv.base + "/v1/chat/completions", timeout=120, json={
        "model": TWO_B, "messages": ASK, "max_tokens": 24, "response_format": OBJECT, **extra})
    assert r.status_code in (200, 400) and srv.healthy(), r.text
    if "repetition_penalty" not in extra:  # temperature alone: greedy in the limit, so it finishes
        assert r.status_code == 200 and isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["n"], int)


def test_the_grammar_holds_whatever_the_samplers_draw(embedded_gguf):
    """Below the contract's mapping (which keeps temperatures and penalties finite), the
    constrained sampler itself never accepts a forbidden token, even from inf/NaN scores."""
    from localgemma.engine import Engine
    from localgemma.sampling import realise
    from localgemma.structured import grammar_for

    engine = Engine(embedded_gguf, n_ctx=256)
    grammar = grammar_for(OBJECT["json_schema"])
    steps = [("grammar", grammar), ("penalties", -1, 1e-40, 0.0, 0.0), ("temp", 1e-39), ("dist", 3)]
    sampler = realise(steps, engine._vocab, engine.n_vocab, engine.n_ctx)
    try:
        ids = engine.tokenize("A number as JSON: ", add_bos=True)
        engine._prefill(ids)
        out = []
        for _ in range(24):
            token = sampler.sample(engine._ctx)
            if engine.is_eog(token):
                break
            out.append(token)
            engine._decode(__import__("llama_cpp").llama_batch_get_one((__import__("llama_cpp").llama_token * 1)(token), 1))
        assert isinstance(json.loads(engine.detokenize(out))["n"], int)
    finally:
        sampler.free()
        engine.close()


# -- 2. schemas too big to compile are refused, not crashed on --------------------------------------

@pytest.mark.parametrize("schema, needle", [
    ({"type": "string", "maxLength": 100000}, "$: maxLength 100000 (at most 1000"),
    ({"type": "string", "maxLength": 30000}, "$: maxLength 30000"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 50000}, "$: maxItems 50000"),
])
def test_huge_repetition_is_refused_with_the_limit(srv, schema, needle):
    r = httpx.post(srv.url(), json={"messages": ASK, "response_format": {"type": "json_schema", "json_schema": schema}})
    assert needle in error_of(r, 400, 3010)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": schema}}}}
    r = httpx.post(srv.base + "/v1/chat/completions", json={"model": TWO_B, "messages": ASK, "tools": [tool]})
    assert "tools[0].parameters (f): the grammar cannot enforce $.properties.x" in error_of(r, 400)
    assert srv.healthy()


# -- 3. non-finite numbers --------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e39", "11"])
def test_lora_scale_must_be_a_finite_number_in_range(srv, adapters, scale):
    r = httpx.post(srv.url(), json={"prompt": "hi", "raw": True, "lora": f"good:{scale}", "response_format": OBJECT})
    message = error_of(r, 400, 3010)
    assert message.startswith(f"lora: 'good:{scale}' has scale '{scale}'") and "from -10 to 10" in message
    assert srv.healthy()


def test_json_nan_and_infinity_are_not_json(srv):
    for constant in ("NaN", "Infinity", "-Infinity"):
        r = httpx.post(srv.url(), content=f'{{"prompt": "hi", "temperature": {constant}}}')
        assert f"{constant} is not a JSON number" in error_of(r, 400)
        r = httpx.post(srv.base + "/v1/completions", headers={"Content-Type": "application/json"},
                       content=f'{{"model": "{TWO_B}", "prompt": "hi", "temperature": {constant}}}')
        assert f"{constant} is not a JSON number" in error_of(r, 400)


def config_cases() -> dict[str, dict]:
    """adapter_config.json edits that used to be accepted, crash, or answer 500."""
    nan, inf = math.nan, math.inf
    return {
        "r NaN": {"r": nan}, "r Infinity": {"r": inf}, "r 0": {"r": 0}, "r -8": {"r": -8}, "r 8.5": {"r": 8.5},
        "r string": {"r": "8"}, "r null": {"r": None},
        "alpha NaN": {"lora_alpha": nan}, "alpha Infinity": {"lora_alpha": inf}, "alpha 1e300": {"lora_alpha": 1e300},
        "alpha 0": {"lora_alpha": 0}, "alpha string": {"lora_alpha": "16"},
        "rank_pattern string value": {"rank_pattern": {"q_proj": "4"}},
        "rank_pattern null value": {"rank_pattern": {"q_proj": None}},
        "rank_pattern list value": {"rank_pattern": {"q_proj": [4]}},
        "rank_pattern not an object": {"rank_pattern": "q_proj"},
        "alpha_pattern NaN": {"alpha_pattern": {"q_proj": nan}},
        "alpha_pattern bad regex": {"alpha_pattern": {"(q_proj": 8}},
        "huge scale": {"lora_alpha": 1e9},
    }


CASES = config_cases()


@pytest.fixture(scope="module")
def adapters(srv, embedded_gguf, tmp_path_factory):
    """A ready finetune 'good' (seed 1) and PEFT folders for another one (seed 2)."""
    root = tmp_path_factory.mktemp("peft-hardening")
    folders = {seed: make_peft_adapter(root / f"s{seed}", embedded_gguf, targets=("q_proj", "v_proj"), seed=seed)
               for seed in (1, 2)}
    assert srv.upload("good", folders[1]).status_code == 200
    return folders


def broken(folder: Path, dest: Path, edit: dict) -> Path:
    dest.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (dest / name).write_bytes((folder / name).read_bytes())
    config = json.loads((dest / "adapter_config.json").read_text())
    config.update(edit)
    (dest / "adapter_config.json").write_text(json.dumps(config))  # NaN/Infinity as Python writes them
    return dest


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_adapter_configs_are_400_and_change_nothing(srv, adapters, tmp_path, case):
    before = listing(srv)
    folder = broken(adapters[2], tmp_path / "a", CASES[case])
    r = srv.upload("hostile", folder)
    message = error_of(r, 400)
    assert "adapter_config.json" in message and str(srv.home) not in message and "/tmp" not in message, message
    after = [e for e in listing(srv) if e["name"] != "hostile"]
    assert after == before  # the pending entry aside, nothing changed
    pending = [e for e in listing(srv) if e["name"] == "hostile"]
    assert pending and pending[0]["status"] == "pending"
    httpx.delete(srv.finetunes("/hostile"))
    assert srv.healthy()


@pytest.mark.parametrize("case", ["r NaN", "alpha 1e300", "rank_pattern list value", "alpha_pattern bad regex"])
def test_hostile_adapter_configs_in_the_cli_are_one_line_errors(srv, adapters, tmp_path, case):
    folder = broken(adapters[2], tmp_path / "a", CASES[case])
    done = cli("finetune", "create", "@localgemma/google/gemma-3-270m", "cli-hostile", folder, home=srv.home)
    assert done.returncode == 1 and done.stdout == "", done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "adapter_config.json" in lines[0], done.stderr


def test_nan_in_the_weights_is_refused(srv, adapters, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = broken(adapters[2], tmp_path / "a", {})
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key][0, 0] = math.nan
    save_file(tensors, folder / "adapter_model.safetensors")
    before = listing(srv)
    assert "NaN or infinite values" in error_of(srv.upload("nan-weights", folder), 400)
    assert [e for e in listing(srv) if e["name"] != "nan-weights"] == before
    httpx.delete(srv.finetunes("/nan-weights"))


@pytest.mark.parametrize("text, needle", [
    ('"deep": ' + "[" * 100000 + "]" * 100000, "nested too deeply"),
    ('"r": ' + "7" * 5000, "a number of 5000 digits is too long (at most 4300)"),
])
def test_config_text_json_cannot_hold_is_a_400_and_changes_nothing(srv, adapters, tmp_path, text, needle):
    folder = broken(adapters[2], tmp_path / "a", {})
    config = folder / "adapter_config.json"
    config.write_text(config.read_text().replace("{", "{" + text + ", ", 1))
    before = listing(srv)
    message = error_of(srv.upload("json-hostile", folder), 400)
    assert "adapter_config.json" in message and needle in message, message
    assert [e for e in listing(srv) if e["name"] != "json-hostile"] == before
    httpx.delete(srv.finetunes("/json-hostile"))
    assert srv.healthy()


def test_a_file_uploaded_before_the_other_is_judged_at_once(srv, adapters, tmp_path):
    """Each asset upload refuses what is wrong with that file alone; the entry keeps no bad file."""
    created = httpx.post(srv.finetunes(), json={"model": TWO_B, "name": "one-by-one"})
    ident = created.json()["result"]["id"]
    url = srv.finetunes(f"/{ident}/finetune-assets")
    config = json.loads((adapters[2] / "adapter_config.json").read_text())
    weights = (adapters[2] / "adapter_model.safetensors").read_bytes()

    def send(file_name: str, data: bytes) -> httpx.Response:
        return httpx.post(url, data={"file_name": file_name}, files={"file": (file_name, data)})

    for data, needle in [(b"{nope", "adapter_config.json is not valid JSON"),
                         (weights, "adapter_config.json is not valid JSON"),
                         (json.dumps({**config, "target_modules": 5}).encode(), '"target_modules" is 5; expected'),
                         (json.dumps({**config, "peft_type": "IA3"}).encode(), '"peft_type": \'IA3\'')]:
        assert needle in error_of(send("adapter_config.json", data), 400)
    assert "is not a safetensors file" in error_of(send("adapter_model.safetensors", b"x" * 4), 400)
    entry = httpx.get(srv.finetunes(f"/{ident}")).json()["result"]
    assert entry["files"] == [] and entry["status"] == "pending"
    r = httpx.post(url, data={"file_name": "adapter_config.json"},
                   files={"file_name": ("x.json", b"{}"), "file": ("adapter_config.json", b"{}")})
    assert "file_name: Input should be a valid string (got a file)" in error_of(r, 400)
    assert send("adapter_config.json", json.dumps(config).encode()).status_code == 200
    assert send("adapter_model.safetensors", weights).json()["result"]["status"] == "ready"
    httpx.delete(srv.finetunes("/one-by-one"))
    assert srv.healthy()


# -- 4. catastrophic backtracking in PEFT's patterns ----------------------------------------------

def test_backtracking_patterns_neither_freeze_the_server_nor_hang(srv, adapters, tmp_path):
    folder = broken(adapters[2], tmp_path / "a", {"rank_pattern": {"(.|\\w|\\w)*Z": 4, "((\\w+)+)+\\.Z": 4},
                                                  "alpha_pattern": {"(a|a?)+$": 8}})
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        pending = pool.submit(srv.upload, "backtrack", folder)
        health = [httpx.get(srv.base + "/health", timeout=2).status_code for _ in range(5)]
        r = pending.result(timeout=60)
    assert health == [200] * 5
    assert r.status_code in (200, 400) and time.monotonic() - start < 30, r.text
    httpx.delete(srv.finetunes("/backtrack"))


def test_a_pattern_that_does_not_finish_in_time_is_refused(embedded_gguf, tmp_path, monkeypatch):
    from localgemma.convert import peft, peft_to_gguf
    from localgemma.errors import ConversionError

    monkeypatch.setattr(peft, "PATTERN_SECONDS", 1e-9)  # any match "takes too long"
    folder = broken(make_peft_adapter(tmp_path / "p", embedded_gguf), tmp_path / "a", {"rank_pattern": {"x+": 4}})
    with pytest.raises(ConversionError, match=r"rank_pattern key 'x\+' takes too long to match"):
        peft_to_gguf(folder, embedded_gguf, tmp_path / "out.gguf")


# -- 5. the registry: refusals change nothing, accepted uploads are served --------------------------

def ask(srv, lora: str) -> str:
    r = httpx.post(srv.url(), json={"prompt": "The capital of France is", "raw": True, "lora": lora,
                                    "temperature": 0, "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["result"]["response"]


def test_a_refused_reupload_leaves_the_ready_finetune_exactly_as_it_was(srv, adapters, tmp_path):
    before, answer = listing(srv), ask(srv, "good")
    foreign = broken(adapters[2], tmp_path / "a", {"r": 4})  # weights say 8: the config does not match
    r = httpx.post(srv.finetunes("/good/finetune-assets"), data={"file_name": "adapter_config.json"},
                   files={"file": ("adapter_config.json", (foreign / "adapter_config.json").read_bytes())})
    assert "does not match the weights" in error_of(r, 400)
    assert listing(srv) == before and ask(srv, "good") == answer


def test_an_accepted_reupload_is_served_at_once(srv, adapters):
    assert srv.upload("swapped", adapters[1]).status_code == 200
    old = ask(srv, "swapped")
    sha = next(e for e in listing(srv) if e["name"] == "swapped")["sha256"]
    r = httpx.post(srv.finetunes("/swapped/finetune-assets"), data={"file_name": "adapter_model.safetensors"},
                   files={"file": ("x", (adapters[2] / "adapter_model.safetensors").read_bytes())})
    assert r.status_code == 200 and r.json()["result"]["sha256"] != sha, r.text
    assert srv.upload("fresh", adapters[2]).status_code == 200
    assert ask(srv, "swapped") == ask(srv, "fresh") != old
    for name in ("swapped", "fresh"):
        httpx.delete(srv.finetunes(f"/{name}"))


# -- 6. slow and half-sent requests time out; connections are capped ------------------------------

def test_half_sent_heads_are_dropped_and_health_answers(srv):
    socks = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        socks.append(s)
    assert srv.healthy()
    time.sleep(1.6)  # LOCALGEMMA_HEADER_TIMEOUT=1
    for s in socks:
        s.settimeout(2)
        data = b""
        while chunk := s.recv(4096):  # until it is closed
            data += chunk
        assert data.startswith(b"HTTP/1.1 408") and b"3007" in data, data
        s.close()
    assert srv.healthy()


def test_a_stalled_body_gets_408(srv):
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST " + srv.url().removeprefix(srv.base).encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    s.settimeout(5)
    data = b""
    while b"stopped arriving" not in data:  # the head and the body may come in separate reads
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 408") and b"3007" in data, data
    s.close()


def test_connections_past_the_cap_get_503_and_health_still_answers(srv):
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(45)]
    try:
        held[-1].settimeout(2)
        assert held[-1].recv(4096).startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert srv.healthy()


# -- 7. hostile model files ---------------------------------------------------------------------------

HOSTILE = {
    "block_count 0": (dict(key="gemma3.block_count", value=0), "gemma3.block_count is 0"),
    "block_count 100000": (dict(key="gemma3.block_count", value=100000), "gemma3.block_count is 100000"),
    "epsilon NaN": (dict(key="gemma3.attention.layer_norm_rms_epsilon", value=math.nan), "layer_norm_rms_epsilon is nan"),
    "dimension 0": (dict(tensor="blk.0.attn_q.weight", dim=0, size=0), "'blk.0.attn_q.weight' has shape"),
    "heads 3 of 4": (dict(key="gemma3.attention.head_count_kv", value=3), "cannot be loaded: llama.cpp failed"),
}


@pytest.fixture(scope="module")
def hostile_files(embedded_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {name: patched(embedded_gguf, root / f"{name.replace(' ', '-')}.gguf", **edit)
            for name, (edit, _) in HOSTILE.items()}


def cli(*args, home: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localgemma", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "LOCALGEMMA_HOME": str(home)})


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_model_files_are_refused_by_run(hostile_files, name, tmp_path):
    done = cli("run", "--model", hostile_files[name], "--raw", "hi", "--max-tokens", "2", home=tmp_path)
    assert done.returncode == 1, done  # not a signal
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and HOSTILE[name][1] in lines[0], done.stderr


@pytest.mark.parametrize("name", ["block_count 0", "block_count 100000", "dimension 0"])
def test_hostile_bases_are_refused_by_convert(hostile_files, name, adapters, tmp_path):
    start = time.monotonic()
    done = cli("convert", "lora", adapters[1], "--base", hostile_files[name], "-o", tmp_path / "a.gguf", home=tmp_path)
    assert done.returncode == 1 and HOSTILE[name][1] in done.stderr, done
    done = cli("convert", "merge", hostile_files[name], f"{adapters[1]}:1", "-o", tmp_path / "m.gguf", home=tmp_path)
    assert done.returncode == 1 and HOSTILE[name][1] in done.stderr, done
    assert time.monotonic() - start < 60 and not list(tmp_path.glob("*.gguf"))


def test_an_adapter_with_mismatched_ranks_is_refused_by_merge(embedded_gguf, tmp_path):
    import numpy as np
    from peft_util import write_gguf_adapter

    bad = write_gguf_adapter(tmp_path / "ranks.gguf", {  # rank 8 in lora_a, 4 in lora_b
        "blk.0.attn_q.weight": (np.zeros((8, 640)), np.zeros((1024, 4)))})
    done = cli("convert", "merge", embedded_gguf, f"{bad}:1", "-o", tmp_path / "m.gguf", home=tmp_path)
    assert done.returncode == 1 and "with the same r" in done.stderr and "Traceback" not in done.stderr, done


def test_a_server_with_a_hostile_model_keeps_serving_the_good_one(hostile_files, embedded_gguf, tmp_path):
    server = Server(tmp_path, "--model", f"{TWO_B}={embedded_gguf}", "--model", f"@x/bad={hostile_files['heads 3 of 4']}",
                    wait_ok=False)
    try:
        health = server.wait_health(lambda r: r.json()["models"].get("@x/bad", "").startswith("error"))
        assert health.status_code == 503 and "cannot be loaded" in health.json()["models"]["@x/bad"]
        r = httpx.post(server.url("@x/bad"), json={"prompt": "hi"})
        assert "cannot be loaded" in error_of(r, 400)
        r = httpx.post(server.url(), json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and server.proc.poll() is None
    finally:
        server.stop()


# -- 8. deep and empty things are 400s naming the field -----------------------------------------------

def test_deep_json_is_a_400_on_every_route(srv):
    deep = b"[" * 100000
    assert "nested too deeply" in error_of(httpx.post(srv.url(), content=deep), 400)
    assert "nested too deeply" in error_of(httpx.post(srv.finetunes(), content=deep), 400)
    r = httpx.post(srv.base + "/v1/chat/completions", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert srv.healthy()


def test_a_number_too_long_to_convert_is_a_400_on_every_route(srv):
    """Python refuses to turn more than 4300 digits into an int: a ValueError, not a JSON error."""
    huge = "9" * 5000
    json_headers = {"Content-Type": "application/json"}
    for url, body in [(srv.url(), f'{{"prompt": "hi", "max_tokens": {huge}}}'),
                      (srv.finetunes(), f'{{"model": "{TWO_B}", "name": {huge}}}'),
                      (srv.base + "/v1/chat/completions", f'{{"model": "{TWO_B}", "messages": [], "seed": {huge}}}'),
                      (srv.base + "/v1/responses", f'{{"model": "{TWO_B}", "input": "hi", "max_output_tokens": {huge}}}'),
                      (srv.base + "/api/generate", f'{{"model": "{TWO_B}", "prompt": "hi", "options": {{"seed": {huge}}}}}'),
                      (srv.base + "/api/chat", f'{{"model": "{TWO_B}", "messages": [], "keep_alive": {huge}}}'),
                      (srv.base + "/api/show", f'{{"model": {huge}}}')]:
        r = httpx.post(url, content=body, headers=json_headers)
        assert r.status_code == 400, (url, r.status_code, r.text[:300])
        assert "5000 digits is too long (at most 4300)" in r.text, (url, r.text[:300])
    assert srv.healthy()


def test_values_of_another_type_are_400s_naming_the_field_on_every_surface(srv):
    """"0", true and 0 are refused where a number, an integer or a boolean is due (they were converted)."""
    cases = [(srv.url(), {"prompt": "hi", "max_tokens": True}, "max_tokens"),
             (srv.url(), {"prompt": "hi", "temperature": "0"}, "temperature"),
             (srv.base + "/v1/chat/completions", {"model": TWO_B, "messages": ASK, "max_tokens": "2"}, "max_tokens"),
             (srv.base + "/v1/chat/completions", {"model": TWO_B, "messages": ASK, "logprobs": 0}, "logprobs"),
             (srv.base + "/v1/responses", {"model": TWO_B, "input": "hi", "stream": 0}, "stream"),
             (srv.base + "/api/generate", {"model": TWO_B, "prompt": "hi", "stream": 0}, "stream"),
             (srv.base + "/api/generate", {"model": TWO_B, "prompt": "hi", "options": {"num_predict": "2"}},
              "options.num_predict"),
             (srv.base + "/api/show", {"model": TWO_B, "verbose": "yes"}, "verbose")]
    for url, body, field in cases:
        r = httpx.post(url, json=body)
        assert r.status_code == 400 and f"{field}: Input should be a valid" in r.text, (url, body, r.text[:300])
    before = listing(srv)
    r = httpx.post(srv.finetunes(), json={"model": TWO_B, "name": "typed", "public": "yes"})
    assert "public: Input should be a valid boolean (got 'yes')" in error_of(r, 400)
    assert listing(srv) == before
    assert srv.healthy()


def test_a_body_that_is_not_utf8_is_named_so_on_every_surface(srv):
    body = '{"model": "%s", "messages": [{"role": "user", "content": "caf\xe9"}], "prompt": "caf\xe9"}' % TWO_B
    for url in (srv.url(), srv.base + "/v1/chat/completions", srv.base + "/v1/responses", srv.base + "/api/chat"):
        r = httpx.post(url, content=body.encode("latin-1"), headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "not UTF-8" in r.text, (url, r.text[:300])
    assert srv.healthy()


def nest(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("schema, needle", [
    (nest(300), "levels deep"),
    ({"enum": []}, "$: enum [] (must be a non-empty list"),
    ({"anyOf": []}, "$: anyOf [] (must be a non-empty list"),
    ({"type": "string", "pattern": "a\x00b"}, "$: pattern"),
    ({"type": "integer", "minimum": math.inf}, "$.minimum: inf (not a JSON number)"),
    # Not JSON Schema at all: each used to reach code that walks a schema expecting its shape.
    ({"type": "object", "properties": [1, 2]}, "$.properties: [1, 2] is not of type 'object'"),
    ({"type": "object", "properties": None}, "$.properties: None is not of type 'object'"),
    ({"type": "object", "properties": {"a": "x"}}, "$.properties.a: 'x' is not of type 'object', 'boolean'"),
    ({"$ref": 5}, "$.$ref: 5 is not of type 'string'"),
    ({"type": "array", "items": {"type": "string"}, "minItems": -5}, "$.minItems: -5 is less than the minimum of 0"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": "a"}, "$.required: 'a' is not of type"),
])
def test_schemas_that_used_to_500_name_the_problem(srv, schema, needle):
    body = {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": schema}}
    r = httpx.post(srv.url(), content=json.dumps(body).replace("Infinity", "1e400"))  # a number JSON allows
    assert needle in error_of(r, 400, 3010)
    assert srv.healthy()


# -- 9. small ones ------------------------------------------------------------------------------------

def test_tool_parameters_that_are_not_json_schema_name_the_problem(srv):
    bad = {"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": "n"}}}
    r = httpx.post(srv.url(), json={"messages": ASK, "tools": [bad]})
    assert "tools[0].parameters (pick): not a valid JSON Schema: $.properties: 'n' is not of type 'object'" in \
        error_of(r, 400, 3010)
    r = httpx.post(srv.base + "/v1/chat/completions", json={"model": TWO_B, "messages": ASK, "tools": [bad]})
    assert "$.properties: 'n' is not of type 'object'" in error_of(r, 400)
    assert srv.healthy()


def test_trailing_slashes_are_served(srv):
    r = httpx.get(srv.finetunes("/"))
    assert r.status_code == 200 and r.json()["success"] is True
    r = httpx.get(srv.base + "/v1/models/")
    assert r.status_code == 200 and r.json()["object"] == "list"
    r = httpx.post(srv.url() + "/", json={"prompt": "hi", "max_tokens": 1}, timeout=60)
    assert r.status_code == 200


def test_a_bindings_file_that_is_not_a_table_is_a_clear_error_and_is_seen_again_once_mended(srv):
    """bindings.json is read by its stat, per request: one broken by hand (a list) is refused
    in the API's shape, naming the file without the server's data path, and the next request
    after it is mended is served."""
    path = srv.home / "bindings.json"
    before = path.read_bytes() if path.exists() else None
    path.write_text("[1, 2]")
    try:
        message = error_of(httpx.get(srv.base + "/v1/models"), 400)
        assert "bindings.json is not a table of model ids" in message and str(srv.home) not in message
        assert srv.healthy()
    finally:
        path.write_bytes(before) if before is not None else path.unlink()
    r = httpx.get(srv.base + "/v1/models")
    assert r.status_code == 200 and TWO_B in [m["id"] for m in r.json()["data"]]


def test_leftovers_of_killed_processes_are_swept_by_the_next_write(srv, adapters):
    root = srv.home / "finetunes"
    stale = root / ".staging-dead"
    stale.mkdir()
    (stale / ".lock").touch()  # nobody holds it: the process that made it is gone
    (root / ".x.tmp").write_bytes(b"half")
    entry = next(e for e in listing(srv) if e["name"] == "good")
    orphan = root / entry["id"] / "v-0000dead0000"
    orphan.mkdir()
    (root / entry["id"] / ".meta.json.tmp").write_bytes(b"{")
    assert httpx.post(srv.finetunes(), json={"model": TWO_B, "name": "sweeper"}).status_code == 200
    assert not stale.exists() and not (root / ".x.tmp").exists() and not orphan.exists()
    assert not (root / entry["id"] / ".meta.json.tmp").exists()
    httpx.delete(srv.finetunes("/sweeper"))


def test_a_context_not_a_multiple_of_256_takes_prompts_longer_than_it_asked_for(embedded_gguf, tmp_path):
    """llama.cpp rounds a context up to 256 cells but capped its batch at the number asked
    for: with --n-ctx 300 a 400-token prompt fitted the 512 cells and its 512-token slice
    aborted the process (GGML_ASSERT n_tokens_all <= n_batch), from one request."""
    prompt = " ".join(f"word{i}" for i in range(130))  # ~400 tokens
    home = home_with_model(tmp_path, embedded_gguf)
    done = cli("run", "--raw", "--temperature", "0", "--max-tokens", "4", "--n-ctx", "300", prompt, home=home,
               timeout=120)
    assert done.returncode == 0 and done.stdout.strip(), done
    server = Server(home, "--model", f"{TWO_B}={embedded_gguf}", "--batch-ctx", "300",
                    env={"LOCALGEMMA_N_CTX": "300"})
    try:
        for extra in ({}, {"seed": 1}):  # batched (the batch context), alone (the engine's)
            r = httpx.post(server.url(), json={"prompt": prompt, "raw": True, "max_tokens": 4, "temperature": 0,
                                               **extra}, timeout=120)
            assert r.status_code == 200 and r.json()["result"]["usage"]["prompt_tokens"] > 300, r.text
        assert server.healthy()
    finally:
        server.stop()


def test_an_empty_api_key_is_refused(tmp_path):
    done = cli("serve", "--api-key", "", "--port", "1", home=tmp_path, timeout=60)
    assert done.returncode == 2 and "--api-key" in done.stderr and "empty" in done.stderr, done


# -- 10. verify: an unreliable PEFT comparison is inconclusive, not a failure ----------------------

def test_verify_calls_an_unreliable_peft_floor_inconclusive():
    from localgemma.verify import Agreement, Report

    good = Agreement(top1=0.9, kl_mean=0.02, kl_max=0.1, positions=50)
    floor = Agreement(top1=0.95, kl_mean=0.01, kl_max=0.05, positions=50)
    base = Agreement(top1=0.3, kl_mean=2.0, kl_max=6, positions=50)
    gemma3_torch = Agreement(top1=0.5, kl_mean=0.8, kl_max=4, positions=50)  # transformers' Gemma 3 GGUF loader
    report = Report("x", good, floor, base, peft="...", adapter_vs_peft=gemma3_torch, peft_noise_floor=gemma3_torch)
    assert report.ok and not report.peft_conclusive
    sound = Report("x", good, floor, base, peft="...", adapter_vs_peft=gemma3_torch, peft_noise_floor=floor)
    assert sound.peft_conclusive and not sound.ok  # a conclusive PEFT comparison that disagrees still fails


# -- 11. multimodal Gemma 3 adapters --------------------------------------------------------------------

def test_vision_tower_modules_are_left_out_and_named(srv, adapters, tmp_path):
    import numpy as np
    from peft_util import write_safetensors
    from safetensors.numpy import load_file

    folder = broken(adapters[2], tmp_path / "mm", {"target_modules": "all-linear"})
    tensors = load_file(folder / "adapter_model.safetensors")
    renamed = {k.replace("base_model.model.model.layers", "base_model.model.model.language_model.layers"): v
               for k, v in tensors.items()}
    for i in range(2):
        for proj in ("q_proj", "out_proj"):
            prefix = f"base_model.model.model.vision_tower.vision_model.encoder.layers.{i}.self_attn.{proj}"
            renamed[f"{prefix}.lora_A.weight"] = np.ones((8, 1152))
            renamed[f"{prefix}.lora_B.weight"] = np.ones((1152, 8))
    renamed["base_model.model.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight"] = np.ones((8, 1152))
    renamed["base_model.model.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.lora_B.weight"] = np.ones((4304, 8))
    write_safetensors(folder / "adapter_model.safetensors", renamed)
    r = srv.upload("multimodal", folder)
    assert r.status_code == 200, r.text
    entry = r.json()["result"]
    assert entry["status"] == "ready"
    note = " ".join(r.json()["messages"] and [m["message"] for m in r.json()["messages"]] or entry.get("notes", []))
    assert "left out 5 vision-tower modules" in note and "fc1, out_proj, q_proj" in note, r.text
    assert srv.upload("text-only", adapters[2]).status_code == 200
    assert ask(srv, "multimodal") == ask(srv, "text-only")  # the language-model part is applied, all of it
    done = cli("convert", "lora", folder, "-o", tmp_path / "mm.gguf", home=srv.home)
    assert done.returncode == 0 and "left out 5 vision-tower modules" in done.stdout + done.stderr, done
    for name in ("multimodal", "text-only"):
        httpx.delete(srv.finetunes(f"/{name}"))
