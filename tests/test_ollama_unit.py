"""Ollama's API (localgemma/server/ollama.py) without a model: name:tag mapping, options and
format translated onto the contract, what is refused (naming field, value and what is allowed),
and the error and stream shapes. tests/test_ollama.py runs the same through a real server."""

from __future__ import annotations

import json
import re

import pytest

from localgemma.errors import InvalidInput, UnknownModel, Unsupported
from localgemma.finetunes import Finetune
from localgemma.server import ollama
from localgemma.server.ollama import ChatRequest, GenerateRequest, Names, Target, translate_options

TWO_B, EMBEDDED = "@cf/google/gemma-2b-it-lora", "@localgemma/google/gemma-3-270m"
SEVEN_B = "@cf/google/gemma-7b-it-lora"


def entry(name: str, model: str = TWO_B, status: str = "ready", ident: str = "") -> Finetune:
    return Finetune(id=ident or f"id-{name}", name=name, model=model, status=status)


@pytest.fixture
def names() -> Names:
    return Names([TWO_B, EMBEDDED], [entry("style"), entry("half", status="pending"), entry("other", EMBEDDED),
                                     entry("orphan", SEVEN_B)], catalog=[EMBEDDED, TWO_B, SEVEN_B])


# -- names -------------------------------------------------------------------------------------

def test_short_names_full_ids_and_tags(names):
    assert ollama.ollama_name(TWO_B) == "gemma-2b-it-lora" and ollama.ollama_name(EMBEDDED) == "gemma-3-270m"
    for name in ("gemma-2b-it-lora", "gemma-2b-it-lora:latest", TWO_B, f"{TWO_B}:latest"):
        assert names.resolve(name) == Target(TWO_B), name
    for name in ("gemma-2b-it-lora:style", f"{TWO_B}:style", "gemma-2b-it-lora:id-style"):
        target = names.resolve(name)
        assert target.model_id == TWO_B and target.lora == "style", name
    assert names.resolve("gemma-3-270m:other").lora == "other"
    assert names.resolve("gemma-2b-it-lora:half").lora == "half"  # pending: the contract says what is missing


def test_unknown_names_are_404_and_say_what_is_served(names):
    for name, why in (("llama3.2", ""), ("gemma-3-270m:style", "gemma-3-270m has no finetune 'style'"),
                      ("gemma-7b-it-lora", f"{SEVEN_B} is in the catalog but not served here"),
                      ("gemma-7b-it-lora:orphan", "catalog"), (f"{TWO_B}/x", "")):
        with pytest.raises(UnknownModel) as info:
            names.resolve(name)
        message = info.value.message
        assert message.startswith(f"model {json.dumps(name)} not found") and why in message, message
        assert "gemma-2b-it-lora:latest, gemma-3-270m:latest" in message and "localgemma serve --model" in message
        assert info.value.openai_status == 404  # what /api/ renders (server/errors.py)


def test_the_listing_has_every_base_and_only_ready_finetunes_of_served_bases(names):
    listed = [name for name, _ in names.listing()]
    assert listed == ["gemma-2b-it-lora:latest", "gemma-3-270m:latest", "gemma-2b-it-lora:style", "gemma-3-270m:other"]


def test_ambiguous_short_names_fall_back_to_full_ids():
    names = Names(["@a/x", "@b/x", "@c/y"])
    assert [n for n, _ in names.listing()] == ["@a/x:latest", "@b/x:latest", "y:latest"]
    assert names.resolve("@b/x").model_id == "@b/x" and names.resolve("y:latest").model_id == "@c/y"
    with pytest.raises(UnknownModel):
        names.resolve("x")


# -- options -----------------------------------------------------------------------------------

def test_options_map_onto_the_contract():
    options = translate_options({"temperature": 0.2, "top_k": 7, "top_p": 0.9, "seed": 42, "num_predict": 12,
                                 "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25,
                                 "stop": ["\n"]})
    assert options.fields == {"temperature": 0.2, "top_k": 7, "top_p": 0.9, "seed": 42, "max_tokens": 12,
                              "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25,
                              "stop": ["\n"]}
    assert translate_options(None).fields == {} and translate_options({}).fields == {}


@pytest.mark.parametrize("options, said", [
    ({"num_predict": "2"}, "options.num_predict: Input should be a valid integer (got '2')"),
    ({"temperature": False}, "options.temperature: Input should be a valid number (got False)"),
])
def test_options_of_another_type_are_refused_naming_the_option(options, said):
    with pytest.raises(InvalidInput, match=re.escape(said)):
        translate_options(options)


def test_an_unknown_field_in_a_message_names_the_message_fields():
    with pytest.raises(InvalidInput, match=re.escape("messages[0].contnet: unknown field; did you mean 'content'?")):
        ollama._validate(ChatRequest, {"model": "m", "messages": [{"role": "user", "contnet": "hi"}]})


def test_request_fields_of_another_type_are_refused():
    from pydantic import ValidationError

    for bad in ({"stream": 0}, {"raw": "true"}, {"top_logprobs": "2"}):
        with pytest.raises(ValidationError):
            GenerateRequest(model="m", prompt="hi", **bad)


def test_off_values_neutral_options_and_runner_options_are_accepted():
    options = translate_options({"top_k": 0, "seed": -1, "num_predict": -1, "min_p": 0, "typical_p": 1.0,
                                 "tfs_z": 1, "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1,
                                 "repeat_last_n": 64, "penalize_newline": False, "num_ctx": 128, "num_batch": 512,
                                 "num_gpu": 0, "main_gpu": 0, "num_thread": 2, "num_keep": 4, "use_mmap": True,
                                 "use_mlock": False, "numa": False, "low_vram": False, "f16_kv": True,
                                 "draft_num_predict": 0})
    assert options.fields == {} and options.fill_context and options.num_ctx == 128
    assert translate_options({"num_predict": -2}).fill_context
    assert translate_options({"repeat_penalty": 1.3, "penalize_newline": True}).fields == {"repetition_penalty": 1.3}
    for off in ({"repeat_penalty": 1}, {"repeat_penalty": 0}, {"presence_penalty": 0, "frequency_penalty": 0}):
        translate_options({**off, "repeat_last_n": 64, "penalize_newline": False})  # penalties off: no effect


@pytest.mark.parametrize("options, words", [
    ({"temperature": 7}, ["options.temperature", "(got 7)", "allowed: 0 to 5"]),
    ({"top_k": 51}, ["options.top_k", "(got 51)", "1 to 50, or 0 (off)"]),
    ({"top_p": -0.5}, ["options.top_p", "(got -0.5)", "0 to 2"]),
    ({"seed": 0}, ["options.seed", "(got 0)", "1 to 9999999999, or -1 (random)"]),
    ({"num_predict": 0}, ["options.num_predict", "(got 0)", "-1 / -2"]),
    ({"repeat_penalty": 3}, ["options.repeat_penalty", "(got 3)", "0 to 2"]),
    ({"presence_penalty": -1}, ["options.presence_penalty", "(got -1)", "0 to 2"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, ["options.stop", "up to 4"]),
    ({"temperature": "hot"}, ["options.temperature", "'hot'"]),
])
def test_out_of_range_options_name_option_value_and_range(options, words):
    with pytest.raises(InvalidInput) as info:
        translate_options(options)
    assert all(w in info.value.message for w in words), info.value.message
    assert info.value.param == f"options.{next(iter(options))}"


@pytest.mark.parametrize("options, words", [
    ({"min_p": 0.05}, ["options.min_p", "0.05", "send 0 (off)"]),
    ({"typical_p": 0.9}, ["options.typical_p", "send 1 (off)"]),
    ({"mirostat": 2}, ["options.mirostat", "send 0 (off)"]),
    ({"mirostat": 1, "mirostat_tau": 5.0}, ["options.mirostat"]),
    ({"repeat_penalty": 1.2, "repeat_last_n": 64}, ["options.repeat_last_n", "64", "this reply"]),
    ({"presence_penalty": 0.5, "penalize_newline": False}, ["options.penalize_newline", "False"]),
    ({"tempreature": 0.5}, ["options.tempreature", "unknown option", "did you mean 'temperature'"]),
    ({"vocab_only": True}, ["options.vocab_only", "unknown option"]),
])
def test_options_that_cannot_be_honoured_are_refused_by_name(options, words):
    with pytest.raises(Unsupported) as info:
        translate_options(options)
    assert all(w in info.value.message for w in words), info.value.message


@pytest.mark.parametrize("options, words", [
    ({"num_thread": "4"}, ["options.num_thread", "a whole number", '"4"']),
    ({"use_mmap": 1}, ["options.use_mmap", "true or false"]),
    ({"num_ctx": 0}, ["options.num_ctx", "at least 1"]),
    ({"mirostat_eta": "x"}, ["options.mirostat_eta", "a number"]),
])
def test_runner_options_are_type_checked(options, words):
    with pytest.raises(InvalidInput) as info:
        translate_options(options)
    assert all(w in info.value.message for w in words), info.value.message


def test_num_ctx_beyond_the_served_context_and_fill_context_settle_once_loaded():
    from localgemma.contract import parse_inputs

    inputs = parse_inputs({"prompt": "hi"})
    assert translate_options({"num_predict": -1}).settle(inputs, 256).max_tokens == 256
    assert translate_options({"num_ctx": 256}).settle(inputs, 256).max_tokens == 256  # the default, unchanged
    with pytest.raises(Unsupported, match=r"options.num_ctx: 4096 is more than .* \(256 tokens\)"):
        translate_options({"num_ctx": 4096}).settle(inputs, 256)


# -- requests -> contract inputs -----------------------------------------------------------------

def generate(**fields) -> dict:
    return ollama.generate_fields(GenerateRequest(model="m", **fields), Target(TWO_B))


def chat(**fields) -> dict:
    return ollama.chat_fields(ChatRequest(model="m", **fields), Target(TWO_B, entry("style")))


def test_generate_prompt_system_raw_and_format():
    assert generate(prompt="hi") == {"prompt": "hi"}
    assert generate(prompt="hi", raw=True) == {"prompt": "hi", "raw": True}
    assert generate(prompt="hi", system="Be brief.") == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    assert generate(prompt="hi", format="json")["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert generate(prompt="hi", format=schema)["response_format"] == {"type": "json_schema", "json_schema": schema}
    assert "response_format" not in generate(prompt="hi", format="")
    for junk in ("xml", [1], 5):
        with pytest.raises(InvalidInput, match=r'format: .* is not accepted; send "json" or a JSON schema'):
            generate(prompt="hi", format=junk)


@pytest.mark.parametrize("fields, words", [
    ({"suffix": "end"}, ["suffix:", "infill"]), ({"template": "{{ .Prompt }}"}, ["template:", "raw: true"]),
    ({"context": [1, 2]}, ["context:", "/api/chat"]), ({"images": ["aGk="]}, ["images:", "text only"]),
    ({"width": 512}, ["width:", "image generation"]),
    ({"raw": True, "system": "x"}, ["raw mode does not support template, system, or context"]),
])
def test_generate_refuses_what_it_cannot_honour(fields, words):
    with pytest.raises(InvalidInput) as info:
        generate(prompt="hi", **fields)
    assert all(w in info.value.message for w in words), info.value.message


def test_generate_accepts_the_neutral_values_the_client_may_send():
    assert generate(prompt="hi", suffix="", template="", context=[], images=[], raw=False) == {"prompt": "hi"}


def test_chat_messages_tool_history_and_the_finetune_tag():
    fields = chat(messages=[
        {"role": "System", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"function": {"index": 0, "name": "get_weather",
                                                           "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18C", "tool_name": "get_weather"},
        {"role": "user", "content": "And?", "thinking": ""}], tools=[{"type": "function", "function": {"name": "f"}}])
    assert fields["lora"] == "style" and fields["tools"] == [{"type": "function", "function": {
        "name": "f", "description": "", "parameters": {"type": "object", "properties": {}}}}]
    assert fields["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": None, "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18C", "name": "get_weather"}, {"role": "user", "content": "And?"}]
    from localgemma.contract import parse_inputs

    parse_inputs(fields)  # the contract takes it as it is
    assert "tools" not in chat(messages=[{"role": "user", "content": "x"}], tools=[])  # the client's default


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user", "content": "x", "images": ["aGk="]}], ["messages[0].images", "text only"]),
    ([{"role": "robot", "content": "x"}], ["messages[0].role", "'robot'", "system, user, assistant or tool"]),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "Sure"}], ["messages[1]", "prefill"]),
    ([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}],
     ["messages[0].tool_calls", "only an assistant turn"]),
])
def test_chat_refuses_what_it_cannot_honour(messages, words):
    with pytest.raises(InvalidInput) as info:
        chat(messages=messages)
    assert all(w in info.value.message for w in words), info.value.message


def test_format_goes_with_tools_as_on_v1():
    """Both reach the contract, which lets a reply be a call or an answer in the format (what
    users of Ollama asked for in ollama/ollama#8095: there the format hid every call)."""
    tool = {"type": "function", "function": {"name": "f"}}
    fields = chat(messages=[{"role": "user", "content": "x"}], tools=[tool], format="json")
    assert fields["tools"][0]["function"]["name"] == "f" and fields["response_format"] == {"type": "json_object"}
    inputs = ollama._parse(fields, ollama.Options({}))
    assert inputs.response_format is not None and len(inputs.tools) == 1


@pytest.mark.parametrize("body, words", [
    ({"model": "m", "think": True}, ['think: "m" does not support thinking']),
    ({"model": "m", "think": "high"}, ["does not support thinking"]),
    ({"model": "m", "think": "deep"}, ["think: 'deep'", "'low', 'medium', 'high' or 'max'"]),
    ({"model": "m", "think": 1}, ["think: 1;"]),
    ({"model": "m", "truncate": True}, ["truncate: true", "never cut"]),
    ({"model": "m", "shift": True}, ["shift: true", "done_reason \"length\""]),
    ({"model": "m", "top_logprobs": 21, "logprobs": True}, ["top_logprobs must be between 0 and 20 (got 21)"]),
    ({"model": "m", "top_logprobs": 2}, ["top_logprobs: needs logprobs: true"]),
])
def test_common_fields_that_cannot_be_honoured(body, words):
    with pytest.raises(InvalidInput) as info:
        ollama._refuse_common(GenerateRequest(**body), body["model"])
    assert all(w in info.value.message for w in words), info.value.message
    ollama._refuse_common(GenerateRequest(model="m", think=False, truncate=False, shift=False, logprobs=True,
                                          top_logprobs=20), "m")


@pytest.mark.parametrize("shape, body, words", [
    (GenerateRequest, {"model": "m", "promt": "x"}, ["promt: unknown field; did you mean 'prompt'?"]),
    (ChatRequest, {"model": "m", "messages": [{"role": "user", "contnt": "x"}]}, ["messages[0].contnt"]),
    (ChatRequest, {"model": "m", "messages": [{"content": "x"}]}, ["messages[0].role: Field required"]),
    (GenerateRequest, {"model": "m", "keep_alive": "5 minutes"}, ["keep_alive:", "'5m'", "'5 minutes'"]),
    (GenerateRequest, {"model": "m", "stream": "sure"}, ["stream:", "'sure'"]),
    (GenerateRequest, [], ["a JSON object, got list"]),
    (GenerateRequest, {"model": "m", "keep_alive": True}, ["keep_alive:", "a number of seconds", "(got True)"]),
    (ChatRequest, {"model": "m", "tools": [{"type": "function", "function": {"name": "f", "x": 1}}]},
     ["tools[0].function.x: unknown field; allowed fields: name, description, parameters"]),
    (ChatRequest, {"model": "m", "tools": "x"}, ["tools: Input should be a valid list (got 'x')"]),
])
def test_bodies_are_checked_field_by_field(shape, body, words):
    with pytest.raises(InvalidInput) as info:
        ollama._validate(shape, body)
    assert all(w in info.value.message for w in words), info.value.message


def test_keep_alive_takes_seconds_and_go_durations():
    for value in (0, 300, -1, "0", "5m", "1h30m", "-1s", "2.5h", "300ms"):
        assert ollama._validate(GenerateRequest, {"model": "m", "keep_alive": value}).keep_alive == value


def test_contract_words_become_the_request_words():
    assert ollama.renamed("response_format: cannot be combined with tools") == "format: cannot be combined with tools"
    assert ollama.renamed("max_tokens: the JSON was not finished within 9 tokens; raise max_tokens") == (
        "options.num_predict: the JSON was not finished within 9 tokens; raise options.num_predict")
    assert ollama.renamed("response_format.json_schema: a JSON schema is required") == (
        "format: a JSON schema is required")
    assert ollama.renamed("lora: finetune 'x' is not usable yet") == "model: finetune 'x' is not usable yet"


# -- answers -----------------------------------------------------------------------------------

def test_parameter_sizes_read_as_ollama_writes_them():
    assert [ollama.human_number(n) for n in (268098176, 2506172416, 7_000_000_000, 8_537_680_896, 1500, 999)] == [
        "268.10M", "2.5B", "7B", "8.5B", "2K", "999"]


def test_tool_calls_in_ollamas_shape():
    calls = ollama.tool_calls(({"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}))
    assert [c["function"] for c in calls] == [{"index": 0, "name": "f", "arguments": {"a": 1}},
                                              {"index": 1, "name": "g", "arguments": {}}]
    assert all(len(c["id"]) == 13 and c["id"].startswith("call_") and c["id"][5:].isalnum() for c in calls)


def test_ndjson_lines_never_split_inside_an_object():
    raw = ollama.line({"response": "a\u2028b\u0085c\ne é"})
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1 and raw.isascii()
    assert raw.decode().splitlines() == [raw.decode().rstrip("\n")]  # what httpx's iter_lines does
    assert json.loads(raw) == {"response": "a\u2028b\u0085c\ne é"}


def test_created_at_is_rfc3339_utc():
    from datetime import datetime

    stamp = ollama.now_rfc3339()
    assert stamp.endswith("Z") and datetime.fromisoformat(stamp.replace("Z", "+00:00")).utcoffset().total_seconds() == 0


def test_errors_under_api_take_ollamas_shape_with_the_class_status():
    from localgemma.errors import NoRoute, NotOffered, QueueFull
    from localgemma.server.errors import render

    for error, status in ((UnknownModel("model \"x\" not found"), 404), (InvalidInput("options.top_k: ..."), 400),
                          (NotOffered("POST /api/pull is not offered"), 501), (QueueFull("busy"), 429),
                          (NoRoute("No route"), 404)):
        for path in ("/api/chat", "/api"):
            response = render({"path": path}, error)
            assert response.status_code == status and json.loads(response.body) == {"error": error.message}
    assert "errors" in json.loads(render({"path": "/apix"}, InvalidInput("x")).body)  # not Ollama's: the envelope
