"""response_format and tools: every output parses and validates (checked with jsonschema)."""

import json

import jsonschema
import pytest
from click.testing import CliRunner

import localgemma
import localgemma.cli
from localgemma.errors import InvalidInput
from localgemma.structured import StructuredOutputError, grammar_for, unenforceable

ASK = [{"role": "user", "content": "Describe one item as JSON."}]

SCHEMAS = {
    "required fields": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                          "ok": {"type": "boolean"}}, "required": ["name", "ok"]},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"enum": [1, 2, 3]}}, "required": ["color", "size"]},
    "nested objects": {"type": "object", "properties": {
        "owner": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 12},
                                                   "last": {"type": "string", "maxLength": 12}},
                  "required": ["first", "last"]}}, "required": ["owner"]},
    "arrays with bounds": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 3}},
        "required": ["tags"]},
    "numbers with bounds": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "level": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
        "required": ["age", "level"]},
    "pattern and format": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "day": {"type": "string", "format": "date"}, "id": {"type": "string", "format": "uuid"}},
        "required": ["code", "day", "id"]},
    "anyOf": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}, {"type": "null"}]}},
        "required": ["value"]},
    "array at the root": {"type": "array", "items": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"]}, "minItems": 1, "maxItems": 2},
}


def run(**fields):
    return localgemma.run(None, {"messages": ASK, "max_tokens": 160, **fields})


# -- unit: what the grammar can enforce ------------------------------------------------------

def test_schema_features_the_grammar_cannot_enforce_are_listed():
    schema = {"type": "object", "properties": {
        "p": {"type": "number", "minimum": 0, "maximum": 1},
        "s": {"type": "string", "pattern": "^a+$", "maxLength": 3},
        "u": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "e": {"type": "string", "format": "email"},
        "o": {"oneOf": [{"type": "string"}, {"type": "null"}]},
        "big": {"type": "integer", "minimum": 0, "maximum": 100000}},
        "required": ["missing"], "minProperties": 1}
    with pytest.raises(InvalidInput) as info:
        grammar_for(schema)
    message = str(info.value)
    assert message.startswith("response_format: the grammar cannot enforce ")
    for needle in ("$.properties.p: minimum", "$.properties.p: maximum", "$.properties.s: maxLength",
                   "$.properties.u: uniqueItems", "$.properties.e: format", "$.properties.o: oneOf",
                   "$.properties.big: minimum", "$: required 'missing'", "$: minProperties"):
        assert needle in message, needle


def test_enforceable_schemas_pass_the_check():
    for name, schema in SCHEMAS.items():
        assert grammar_for(schema), name
    assert unenforceable({"type": "string", "description": "annotations are fine", "title": "t"}) == []


@pytest.mark.e2e
def test_schema_shapes_of_workers_ai_and_openai_both_work():
    a = run(response_format={"type": "json_schema", "json_schema": SCHEMAS["enums"]}, temperature=0)
    b = run(response_format={"type": "json_schema",
                             "json_schema": {"name": "item", "strict": True, "schema": SCHEMAS["enums"]}}, temperature=0)
    assert a["response"] == b["response"]


# -- e2e: the schema set -----------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_validates(name):
    schema = SCHEMAS[name]
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 11}, {"temperature": 1.3, "seed": 12}):
        out = run(response_format={"type": "json_schema", "json_schema": schema}, **sampling)
        jsonschema.validate(out["response"], schema)  # a parsed value, not a string
        assert not isinstance(out["response"], str) or schema.get("type") == "string"


@pytest.mark.e2e
def test_streaming_with_a_schema_streams_json_and_ends_with_the_value():
    fields = dict(response_format={"type": "json_schema", "json_schema": SCHEMAS["nested objects"]},
                  temperature=0.9, seed=3)
    chunks = list(run(stream=True, **fields))
    text = "".join(c["response"] for c in chunks)
    assert json.loads(text) == chunks[-1]["parsed"] == run(**fields)["response"]
    jsonschema.validate(chunks[-1]["parsed"], SCHEMAS["nested objects"])


@pytest.mark.e2e
def test_json_cut_short_by_max_tokens_is_a_clear_error():
    with pytest.raises(StructuredOutputError, match="max_tokens: the JSON was not finished within 5 tokens"):
        run(response_format={"type": "json_schema", "json_schema": SCHEMAS["nested objects"]}, max_tokens=5)


@pytest.mark.e2e
def test_json_finished_by_the_last_token_allowed_is_an_answer():
    """The JSON closed on the very token max_tokens allowed (no room left for the end of turn)."""
    fields = {"response_format": {"type": "json_schema", "json_schema": SCHEMAS["nested objects"]}, "temperature": 0}
    whole = run(**fields)
    n = whole["usage"]["completion_tokens"]
    assert run(**fields, max_tokens=n)["response"] == whole["response"]
    with pytest.raises(StructuredOutputError, match=f"max_tokens: the JSON was not finished within {n - 2} tokens"):
        run(**fields, max_tokens=n - 2)  # (n - 1 may end on whitespace after the last brace)


def test_parse_tells_a_finished_value_from_a_cut_one():
    from localgemma.structured import parse

    assert parse('{"a": [1, 2]}', {"type": "object"}, "length", 9) == {"a": [1, 2]}
    with pytest.raises(StructuredOutputError, match="max_tokens: the JSON was not finished within 9 tokens"):
        parse('{"a": [1, 2', {"type": "object"}, "length", 9)
    with pytest.raises(StructuredOutputError, match="response_format: constrained output is not JSON"):
        parse('{"a": [1, 2', {"type": "object"}, "stop", 9)


@pytest.mark.e2e
def test_json_object_gives_an_object():
    out = localgemma.run(None, {"prompt": 'The JSON object {"a": 1} is', "raw": True,
                                "response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 64})
    assert isinstance(out["response"], dict)


@pytest.mark.parametrize("bad,message", [
    ({"type": "xml"}, "response_format.type: "),
    ({"type": "json_schema"}, "response_format.json_schema: a JSON schema is required"),
    ({"type": "json_schema", "json_schema": {"type": "number", "minimum": 0.5}}, "$: minimum"),
    ({"type": "json_schema", "json_schema": {"type": "banana"}}, "$.type: 'banana' is not one of ['array', 'boolean'"),
])
def test_bad_schemas_refused(bad, message):
    with pytest.raises(InvalidInput) as info:
        run(response_format=bad)
    assert message in str(info.value)


@pytest.mark.e2e
def test_cli_input_with_response_format(tmp_path):
    request = {"messages": ASK, "max_tokens": 160, "temperature": 0,
               "response_format": {"type": "json_schema", "json_schema": SCHEMAS["enums"]}}
    path = tmp_path / "req.json"
    path.write_text(json.dumps(request))
    result = CliRunner().invoke(localgemma.cli.main, ["run", "--input", str(path), "--json"])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.output)["response"], SCHEMAS["enums"])


# -- tools ---------------------------------------------------------------------------------

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                           "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"]}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
SCHEMA_OF = {"get_weather": WEATHER["parameters"], "add": ADD["function"]["parameters"]}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def ask(**fields):
    return localgemma.run(None, {"messages": QUESTION, "tools": TOOLS, "max_tokens": 80, **fields})


@pytest.mark.e2e
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.2, "seed": 4}])
def test_required_gives_a_valid_call(sampling):
    out = ask(tool_choice="required", **sampling)
    (call,) = out["tool_calls"]
    assert call["name"] in SCHEMA_OF and out["response"] == ""
    jsonschema.validate(call["arguments"], SCHEMA_OF[call["name"]])


@pytest.mark.e2e
def test_named_function_is_the_one_called():
    (call,) = ask(tool_choice={"type": "function", "function": {"name": "add"}}, temperature=0)["tool_calls"]
    assert call["name"] == "add"
    jsonschema.validate(call["arguments"], SCHEMA_OF["add"])


@pytest.mark.e2e
def test_auto_is_text_or_a_valid_call_and_none_is_text():
    for seed in (1, 2, 3):
        out = ask(temperature=1.0, seed=seed)
        if "tool_calls" in out:
            jsonschema.validate(out["tool_calls"][0]["arguments"], SCHEMA_OF[out["tool_calls"][0]["name"]])
        else:
            assert out["response"] and not out["response"].lstrip().startswith("{")
    assert "tool_calls" not in ask(tool_choice="none", temperature=0)


@pytest.mark.e2e
def test_streamed_call_arrives_in_the_last_event():
    chunks = list(ask(tool_choice="required", temperature=0, stream=True))
    assert chunks[-1]["tool_calls"] == ask(tool_choice="required", temperature=0)["tool_calls"]


@pytest.mark.e2e
def test_deprecated_functions_are_tools():
    out = localgemma.run(None, {"messages": QUESTION, "functions": [{"name": "lookup", "code": "return 1"}],
                                "tool_choice": "required", "temperature": 0, "max_tokens": 60})
    assert out["tool_calls"][0]["name"] == "lookup" and isinstance(out["tool_calls"][0]["arguments"], dict)


@pytest.mark.e2e
def test_tool_result_round_trip():
    from localgemma.contract import parse_inputs
    from localgemma.runtime import encode, get_engine

    call = ask(tool_choice="required", temperature=0)["tool_calls"][0]

    def next_turn(result):
        history = QUESTION + [{"role": "assistant", "content": json.dumps(call)},
                              {"role": "tool", "name": call["name"], "content": result}]
        return {"messages": history, "tools": TOOLS, "tool_choice": "none", "temperature": 0, "max_tokens": 30}

    engine = get_engine(None)
    prompt = engine.detokenize(encode(engine, parse_inputs(next_turn("18C and sunny"))))
    assert f"Result of the tool call to {call['name']}:\n18C and sunny" in prompt
    # the result reaches the model: a different result gives a different next-token distribution
    sunny, snow = (engine.logits(encode(engine, parse_inputs(next_turn(r))))[-1]
                   for r in ("18C and sunny", "-5C, heavy snow, roads closed"))
    assert abs(sunny - snow).max() > 0.1
    assert localgemma.run(None, next_turn("18C and sunny"))["response"]  # and the turn is answered


@pytest.mark.parametrize("tools,choice,message", [
    ([WEATHER, WEATHER], None, "tools[1].name: 'get_weather' is defined twice"),
    ([{**WEATHER, "name": "get weather"}], None, "tools[0].name: 'get weather' is not allowed"),
    ([{**WEATHER, "parameters": {"type": "string"}}], None, "tools[0].parameters.type: 'string'"),
    ([{**WEATHER, "parameters": {"type": "object", "properties": {"t": {"type": "number", "minimum": 0}}}}], None,
     "tools[0].parameters (get_weather): the grammar cannot enforce $.properties.t: minimum"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name: 'nope' is not one"),
    ([{"description": "no name"}], None, "tools[0]"),
])
def test_bad_tool_definitions_refused(tools, choice, message):
    with pytest.raises(InvalidInput) as info:
        localgemma.run(None, {"messages": QUESTION, "tools": tools, "tool_choice": choice})
    assert message in str(info.value)


GREETING = {"type": "json_schema", "json_schema": {"type": "object", "properties": {
    "greeting": {"type": "string", "maxLength": 20}}, "required": ["greeting"]}}
CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}


@pytest.mark.e2e
def test_tools_with_a_response_format_give_a_call_or_an_answer_of_that_shape():
    """As OpenAI has it (pydantic-ai's NativeOutput with tools, instructor's RESPONSES_TOOLS):
    a reply that is not a call follows the response_format."""
    def asked(**fields):
        return localgemma.run(None, {"messages": [{"role": "user", "content": "Write a greeting. Do not use any tool."}],
                                     "tools": [CITY_TOOL], "response_format": GREETING, "max_tokens": 120, **fields})

    (call,) = asked(tool_choice="required", temperature=0)["tool_calls"]
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)
    answer = asked(tool_choice="none", temperature=0)["response"]
    jsonschema.validate(answer, GREETING["json_schema"])
    kinds = set()
    for seed in (1, 2, 3, 4):  # auto: either, each valid (seed 1 answers, found by trying)
        out = asked(temperature=2, top_k=50, seed=seed)
        if "tool_calls" in out:
            kinds.add("call")
            assert out["tool_calls"][0]["name"] == "get_weather" and out["response"] == ""
        else:
            kinds.add("answer")
            jsonschema.validate(out["response"], GREETING["json_schema"])
    assert "answer" in kinds
    events = list(asked(temperature=2, top_k=50, seed=1, stream=True))  # the answer goes out whole, then parsed
    assert len(events) == 2 and json.loads(events[0]["response"]) == events[1]["parsed"] == asked(
        temperature=2, top_k=50, seed=1)["response"]


def test_a_tools_local_definitions_are_enforced_where_its_references_point():
    """pydantic writes nested models as $defs + $ref; inside the call schema they would point
    at the wrapper's root, so each tool's definitions move there, renamed."""
    from localgemma.tools import Tool, call_schema, grammar

    nested = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"], "$defs": {
        "P": {"type": "object", "properties": {"n": {"type": "string"}, "q": {"$ref": "#/$defs/Q"}}, "required": ["n"]},
        "Q": {"type": "integer"}}}
    tools = [Tool("f", "", nested), Tool("g", "", {"type": "object", "properties": {"x": {"$ref": "#/definitions/X"}},
                                                   "definitions": {"X": {"type": "boolean"}}})]
    schema = call_schema(tools)
    assert schema["$defs"] == {"f.P": {"type": "object", "properties": {"n": {"type": "string"},
                                                                        "q": {"$ref": "#/$defs/f.Q"}}, "required": ["n"]},
                               "f.Q": {"type": "integer"}, "g.X": {"type": "boolean"}}
    assert schema["anyOf"][0]["properties"]["arguments"]["properties"]["p"] == {"$ref": "#/$defs/f.P"}
    for mode in ("auto", "required"):
        assert "f-P ::=" in grammar(tools, mode, None)
    assert "f-P ::=" in grammar(tools, "auto", None, {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}},
                                                      "$defs": {"A": {"type": "string"}}})


def test_a_response_format_beside_tools_is_checked_in_every_mode():
    bad = {"type": "json_schema", "json_schema": {"type": "object", "properties": [1]}}
    for choice in ("auto", "required", "none", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(InvalidInput, match=r"response_format: not a valid JSON Schema: \$.properties: \[1\]"):
            localgemma.run(None, {"messages": QUESTION, "tools": [WEATHER], "tool_choice": choice,
                                  "response_format": bad})


def test_a_reply_beside_a_response_format_is_a_call_only_when_it_is_one():
    from localgemma.tools import Tool, parse_call

    tools = [Tool("get_weather", "", {"type": "object"})]
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parse_call(call, tools, "auto", answer=True) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    for reply in ('{"greeting": "hi"}', '{"name": "other", "arguments": {}}', '{"name": "get_weather", "argum',
                  '"a string answer"'):
        assert parse_call(reply, tools, "auto", cut=9, answer=True) is None  # the answer's (structured.parse)
    with pytest.raises(StructuredOutputError, match="max_tokens: the tool call was not finished within 9 tokens"):
        parse_call('{"name": "get_weather", "argum', tools, "auto", cut=9)


def test_choice_without_tools_refused():
    with pytest.raises(InvalidInput, match="tool_choice: asks for a tool call, but the request has no tools"):
        localgemma.run(None, {"messages": QUESTION, "tool_choice": "required"})


def test_enum_values_past_what_the_grammar_holds_in_time_are_refused():
    from localgemma.structured import MAX_ENUM_VALUES, check

    check({"enum": list(range(MAX_ENUM_VALUES))})
    with pytest.raises(InvalidInput, match=f"enum values to {MAX_ENUM_VALUES + 2} \\(at most {MAX_ENUM_VALUES}"):
        check({"type": "object", "properties": {"a": {"enum": list(range(MAX_ENUM_VALUES // 2 + 1))},
                                                "b": {"enum": list(range(MAX_ENUM_VALUES // 2 + 1))}}})
