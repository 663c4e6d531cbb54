"""The clients people already use, unchanged but for the base URL, against a real
`localgemma serve` on the embedded model: openai (Chat Completions and Responses), cloudflare,
langchain-openai, pydantic-ai, instructor and llm. Each test is a few tokens long.

The server binds the Workers AI ids to the embedded GGUF, so the clients ask for the ids
their users would. Outputs are checked for what a user of each client relies on: the right
types, parsed values that validate, tool calls with their arguments, streams that add up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import BaseModel, Field
from servers import TWO_B, Server, home_with_model

pytestmark = pytest.mark.e2e

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    """Get the weather for a city."""

    city: str = Field(description="the city", max_length=20)


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=1, le=99)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, embedded_gguf):
    home = tmp_path_factory.mktemp("clients-home")
    home_with_model(home, embedded_gguf)
    server = Server(home, "--model", f"{TWO_B}={embedded_gguf}")
    server.home = home
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oai(srv):
    import openai

    return openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)


# -- openai: Chat Completions ---------------------------------------------------------------------

def test_openai_chat_and_stream_agree(oai):
    whole = oai.chat.completions.create(model=TWO_B, messages=ASK, max_tokens=8, temperature=0)
    parts = list(oai.chat.completions.create(model=TWO_B, messages=ASK, max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == parts[-1].choices[0].finish_reason


def test_openai_tools_strict_pydantic_function_tool_and_parallel_flag(oai):
    import openai

    tool = openai.pydantic_function_tool(Weather)  # strict: true, additionalProperties: false
    assert tool["function"]["strict"] is True
    out = oai.chat.completions.create(model=TWO_B, messages=ASK, tools=[tool], tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=48, temperature=0)
    call = out.choices[0].message.tool_calls[0]
    assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "Weather"
    Weather.model_validate_json(call.function.arguments)
    bare = {"type": "function", "function": {"name": "now", "description": None}}  # no parameters: no arguments
    out = oai.chat.completions.create(model=TWO_B, messages=ASK, tools=[bare], tool_choice="required", max_tokens=16)
    assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {}


def test_openai_streamed_tool_call_and_streamed_text_with_auto(oai):
    import openai

    stream = oai.chat.completions.create(model=TWO_B, messages=ASK, tools=[openai.pydantic_function_tool(Weather)],
                                         tool_choice="required", max_tokens=48, temperature=0, stream=True)
    chunks = list(stream)
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls and calls[0][0].function.name == "Weather" and not any(
        c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # auto, answered in text: the text streams piece by piece, not as one chunk at the end
    raw = [{"role": "user", "content": "Write a short poem about the sea."}]
    chunks = list(oai.chat.completions.create(model=TWO_B, messages=raw, tools=[openai.pydantic_function_tool(Weather)],
                                              tool_choice="auto", max_tokens=24, temperature=0, stream=True))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 3, texts


def test_openai_parse_with_a_pydantic_model(oai):
    out = oai.chat.completions.parse(model=TWO_B, messages=[{"role": "user", "content": "A person as JSON."}],
                                     response_format=Person, max_tokens=60, temperature=0)
    person = out.choices[0].message.parsed
    assert isinstance(person, Person) and 1 <= person.age <= 99


def test_openai_stop_sequences(oai):
    prompt = "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9,"
    free = oai.completions.create(model=TWO_B, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    cut = free[len(free) // 2:len(free) // 2 + 2]
    assert cut.strip(), free
    out = oai.completions.create(model=TWO_B, prompt=prompt, max_tokens=16, temperature=0, stop=[cut, "zzz"])
    assert out.choices[0].text == free[:free.index(cut)] and out.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(model=TWO_B, prompt=prompt, max_tokens=16, temperature=0, stop=cut, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_openai_logprobs_chat_and_completions(oai):
    import math

    out = oai.chat.completions.create(model=TWO_B, messages=ASK, max_tokens=6, temperature=0, logprobs=True,
                                      top_logprobs=3)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    assert "".join(e.token for e in entries) == out.choices[0].message.content
    for e in entries:  # greedy: the token is the most likely one, and probabilities are probabilities
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.logprob <= 0 and sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1.0001
    streamed = oai.chat.completions.create(model=TWO_B, messages=ASK, max_tokens=6, temperature=0, logprobs=True,
                                           stream=True)
    got = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert got == [e.token for e in entries]
    legacy = oai.completions.create(model=TWO_B, prompt="The capital of France is", max_tokens=4, temperature=0,
                                    logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4 and "".join(lp.tokens) == legacy.choices[0].text


# -- openai: Responses ------------------------------------------------------------------------------

def test_openai_responses_whole_streamed_and_with_a_tool(oai):
    out = oai.responses.create(model=TWO_B, input="Name a colour.", instructions="Be brief.", max_output_tokens=8,
                               temperature=0)
    assert out.status in ("completed", "incomplete") and out.output_text and out.usage.output_tokens <= 8
    events = list(oai.responses.create(model=TWO_B, input="Name a colour.", instructions="Be brief.",
                                       max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == out.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with oai.responses.stream(model=TWO_B, input="Weather in Paris?", max_output_tokens=48, temperature=0,
                              tools=[{"type": "function", "name": "get_weather", "parameters": Weather.model_json_schema()}],
                              tool_choice="required") as stream:
        final = stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and "city" in json.loads(call.arguments)
    follow = oai.responses.create(model=TWO_B, max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"}, {"type": "function_call", "call_id": call.call_id,
                                                            "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}])
    assert follow.output_text


def test_openai_responses_refuses_what_it_cannot_keep(oai):
    import openai

    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oai.responses.create(model=TWO_B, input="hi", previous_response_id="resp_123")
    with pytest.raises(openai.BadRequestError, match="store"):
        oai.responses.create(model=TWO_B, input="hi", store=True)
    # Errors name the Responses API's own fields, not the contract's max_tokens / response_format.
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model=TWO_B, input="hi", max_output_tokens=0)
    assert info.value.param == "max_output_tokens" and "max_tokens" not in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model=TWO_B, input="hi", text={"format": {"type": "json_schema", "name": "x",
                                                                       "schema": {"type": "object", "properties": 5}}})
    assert "text.format" in info.value.message and "response_format" not in info.value.message
    with pytest.raises(openai.BadRequestError, match="text.fromat"):
        oai.responses.create(model=TWO_B, input="hi", extra_body={"text": {"fromat": {"type": "json_object"}}})


# -- cloudflare ---------------------------------------------------------------------------------

def test_cloudflare_sdk_run_and_finetunes(srv, embedded_gguf, tmp_path):
    from cloudflare import Cloudflare
    from peft_util import make_peft_adapter

    cf = Cloudflare(api_token="unused", base_url=srv.base + "/client/v4", max_retries=0)
    out = cf.ai.run(TWO_B, account_id="acct", prompt="The capital of France is", raw=True, max_tokens=4,
                    temperature=0)
    assert out["usage"]["completion_tokens"] == 4 and out["response"]
    created = cf.ai.finetunes.create(account_id="acct", model=TWO_B, name="cf-sdk", description="via the SDK",
                                     public=True)
    assert created.id and created.created_at and created.modified_at and created.public is True
    folder = make_peft_adapter(tmp_path / "peft", embedded_gguf, seed=9)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        cf.ai.finetunes.assets.create(created.id, account_id="acct", file=(folder / name).read_bytes(), file_name=name)
    listed = [f for f in cf.ai.finetunes.list(account_id="acct")]
    mine = next(f for f in listed if f.name == "cf-sdk")
    assert mine.created_at and mine.modified_at and mine.model == TWO_B
    assert [f.name for f in cf.ai.finetunes.public.list(account_id="acct")] == ["cf-sdk"]
    adapted = cf.ai.run(TWO_B, account_id="acct", prompt="The capital of France is", raw=True, max_tokens=4,
                        temperature=0, lora="cf-sdk")
    assert adapted["response"] != out["response"]


# -- langchain ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lc(srv):
    from langchain_openai import ChatOpenAI

    return lambda **kw: ChatOpenAI(base_url=srv.base + "/v1", api_key="unused", model=TWO_B, temperature=0,
                                   max_tokens=kw.pop("max_tokens", 24), max_retries=0, **kw)


def test_langchain_invoke_stream_stop_and_tools(lc):
    llm = lc()
    whole = llm.invoke("Name a colour.")
    assert isinstance(whole.content, str) and whole.content
    assert "".join(c.content for c in llm.stream("Name a colour.")) == whole.content
    cut = llm.invoke("Name a colour.", stop=[whole.content[2:4]])
    assert whole.content[2:4] not in cut.content
    called = llm.bind_tools([Weather], tool_choice="required").invoke("Weather in Paris?", max_tokens=48)
    assert called.tool_calls[0]["name"] == "Weather" and Weather.model_validate(called.tool_calls[0]["args"])


def test_langchain_structured_output_both_methods_and_responses(lc):
    for method in ("function_calling", "json_schema"):
        person = lc(max_tokens=64).with_structured_output(Person, method=method).invoke("A person.")
        assert isinstance(person, Person) and 1 <= person.age <= 99, method
    reply = lc(use_responses_api=True).invoke("Name a colour.")
    assert reply.text and reply.usage_metadata["output_tokens"] > 0


# -- pydantic-ai --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pai_model(srv):
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(TWO_B, provider=OpenAIProvider(base_url=srv.base + "/v1", api_key="unused"))


def test_pydantic_ai_agent_with_a_tool_structured_and_streaming(pai_model):
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.settings import ModelSettings
    from pydantic_ai.usage import UsageLimits

    settings = ModelSettings(temperature=0, max_tokens=48)
    agent = Agent(pai_model, model_settings=settings, system_prompt="Be brief.")

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "18C, sunny"

    assert isinstance(agent.run_sync("Say hello.").output, str)
    person = Agent(pai_model, output_type=Person, model_settings=ModelSettings(temperature=0, max_tokens=64))
    assert 1 <= person.run_sync("A person.").output.age <= 99
    # Native structured output beside a tool: response_format and tools in one request.
    native = Agent(pai_model, output_type=NativeOutput(Person), model_settings=ModelSettings(temperature=0,
                                                                                             max_tokens=64))
    native.tool_plain(get_weather)
    assert 1 <= native.run_sync("A person.", usage_limits=UsageLimits(request_limit=4)).output.age <= 99

    async def streamed() -> list[str]:
        async with agent.run_stream("Say hello.") as run:
            return [part async for part in run.stream_text(delta=True)]

    import asyncio

    assert "".join(asyncio.run(streamed()))


# -- instructor ---------------------------------------------------------------------------------

def test_instructor_tools_with_bounded_ints_and_json_schema(srv):
    import instructor
    import openai

    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        client = instructor.from_openai(openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0),
                                        mode=mode)
        person = client.chat.completions.create(model=TWO_B, response_model=Person, max_retries=0, max_tokens=64,
                                                temperature=0, messages=[{"role": "user", "content": "A person."}])
        assert isinstance(person, Person) and 1 <= person.age <= 99, mode
    # The Responses API with a forced tool call and text.format together (instructor sends both).
    client = instructor.from_openai(openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0),
                                    mode=instructor.Mode.RESPONSES_TOOLS)
    person = client.responses.create(model=TWO_B, response_model=Person, max_retries=0, max_output_tokens=64,
                                     temperature=0, input="A person.")
    assert isinstance(person, Person) and 1 <= person.age <= 99


# -- llm ----------------------------------------------------------------------------------------

def test_llm_prompt_schema_and_functions(srv, tmp_path):
    user = tmp_path / "llm"
    user.mkdir()
    (user / "extra-openai-models.yaml").write_text(
        f"- model_id: local\n  model_name: '{TWO_B}'\n  api_base: '{srv.base}/v1'\n  api_key_name: none\n"
        "  supports_schema: true\n  supports_tools: true\n")
    (user / "keys.json").write_text(json.dumps({"none": "unused"}))
    env = {**os.environ, "LLM_USER_PATH": str(user)}
    llm = [sys.executable, "-m", "llm"]

    def run(*args: str) -> str:
        done = subprocess.run([*llm, *args], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run("-m", "local", "-o", "temperature", "0", "-o", "max_tokens", "8", "Name a colour.").strip()
    out = json.loads(run("-m", "local", "--schema", "name, age int", "-o", "temperature", "0", "-o", "max_tokens", "64",
                         "Alice is 30 years old. As JSON:"))
    assert out == {"name": "Alice", "age": 30}
    functions = tmp_path / "tools.py"
    functions.write_text("def weather(city):\n    return '18C'\n")  # no docstring, no annotations
    assert run("-m", "local", "--functions", str(functions), "-o", "max_tokens", "16", "Say hi.") is not None
    assert run("-m", "local", "-o", "max_tokens", "16", "-o", "stop", ".", "Count: 1. 2. 3.").count(".") == 0


# -- Workers AI: tool conversations, text parts, streamed calls, ids the server was not started with --

TOOLS_WAI = [{"name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                             "required": ["city"]}}]


def test_workers_ai_tool_loop_as_clients_send_it(srv):
    """Step 2 of a client-driven tool loop (the Vercel AI SDK's workers-ai-provider does this):
    the assistant's call goes back in both shapes, the result as a tool message."""
    import time

    import httpx
    from cloudflare import Cloudflare

    cf = Cloudflare(api_token="unused", base_url=srv.base + "/client/v4", max_retries=0)
    first = cf.ai.run(TWO_B, account_id="acct", messages=ASK, tools=TOOLS_WAI, max_tokens=48, temperature=0,
                      extra_body={"tool_choice": "required"})  # tool_choice: our extension, OpenAI's meaning
    call = first["tool_calls"][0]
    assert first["response"] == "" and call["name"] == "get_weather" and "city" in call["arguments"]
    for assistant in ({"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "call_1", "type": "function",
                           "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]}):
        result = {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}
        messages = [*ASK, assistant, result]
        out = cf.ai.run(TWO_B, account_id="acct", messages=messages, tools=TOOLS_WAI, max_tokens=64, temperature=0)
        assert out["response"] or out["tool_calls"][0]["name"] == "get_weather"  # text, or another call
    parts = cf.ai.run(TWO_B, account_id="acct", max_tokens=4, temperature=0,
                      messages=[{"role": "user", "content": [{"type": "text", "text": "What is the "},
                                                             {"type": "text", "text": "weather in Paris?"}]}])
    same = cf.ai.run(TWO_B, account_id="acct", messages=ASK, max_tokens=4, temperature=0)
    assert parts["response"] == same["response"]
    r = httpx.post(srv.url(), json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert r.status_code == 400 and "only text parts" in r.json()["errors"][0]["message"]
    # streamed: the call never arrives as response text, only in the last event
    with httpx.stream("POST", srv.url(), json={"messages": ASK, "tools": TOOLS_WAI, "tool_choice": "required",
                                               "max_tokens": 48, "temperature": 0, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert all(e["response"] == "" for e in events) and events[-1]["tool_calls"][0] == call
    # an id the server was not started with: refused at once, saying how to serve it
    start = time.monotonic()
    r = httpx.post(srv.url("@cf/google/gemma-7b-it-lora"), json={"prompt": "hi"})
    message = r.json()["errors"][0]["message"]
    assert r.status_code == 400 and time.monotonic() - start < 2
    assert "--model @cf/google/gemma-7b-it-lora=" in message and "localgemma models pull" in message
    models = {m["id"] for m in httpx.get(srv.base + "/v1/models").json()["data"]}
    assert TWO_B in models and "@cf/google/gemma-7b-it-lora" not in models
