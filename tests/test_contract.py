"""Validation of every field and bound of the contract (fast, no model)."""

import pytest

from localgemma.contract import MessagesInputs, PromptInputs, parse_inputs
from localgemma.errors import InvalidInput


def err(data) -> str:
    with pytest.raises(InvalidInput) as info:
        parse_inputs(data)
    return str(info.value)


def test_defaults_are_the_contracts():
    inputs = parse_inputs({"prompt": "hi"})
    assert isinstance(inputs, PromptInputs)
    assert (inputs.stream, inputs.max_tokens, inputs.temperature, inputs.raw) == (False, 256, 0.6, False)
    assert inputs.top_p is inputs.top_k is inputs.seed is inputs.lora is None
    assert inputs.repetition_penalty is inputs.frequency_penalty is inputs.presence_penalty is None


def test_messages_shape():
    inputs = parse_inputs({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
    assert isinstance(inputs, MessagesInputs)
    assert [m.role for m in inputs.messages] == ["system", "user"]


def test_seed_example_raw_as_string_is_accepted():
    # The seed page's own curl example sends "raw": "true".
    assert parse_inputs({"prompt": "tell me a story", "raw": "true", "lora": "x"}).raw is True


@pytest.mark.parametrize("field, bad, said", [
    ("max_tokens", True, "max_tokens: Input should be a valid integer (got True)"),
    ("max_tokens", "2", "max_tokens: Input should be a valid integer (got '2')"),
    ("max_tokens", 2.5, "max_tokens: Input should be a valid integer (got 2.5)"),
    ("temperature", "0", "temperature: Input should be a valid number (got '0')"),
    ("temperature", False, "temperature: Input should be a valid number (got False)"),
    ("seed", "7", "seed: Input should be a valid integer (got '7')"),
    ("stream", 0, "stream: Input should be a valid boolean (got 0)"),
    ("raw", "yes", "raw: Input should be a valid boolean (got 'yes')"),
])
def test_values_of_another_type_are_refused_not_converted(field, bad, said):
    with pytest.raises(InvalidInput) as info:
        parse_inputs({"prompt": "hi", field: bad})
    assert info.value.message == said


def test_a_whole_number_written_with_a_point_is_that_integer():
    inputs = parse_inputs({"prompt": "hi", "max_tokens": 2.0, "seed": 7.0, "temperature": 1})
    assert (inputs.max_tokens, inputs.seed, inputs.temperature) == (2, 7, 1.0) and type(inputs.max_tokens) is int


@pytest.mark.parametrize("inputs, said", [
    ({"messages": [{"role": "user", "content": "hi", "contnet": "x"}]},
     "messages[0].contnet: unknown field; did you mean 'content'?"),
    ({"messages": [{"role": "user", "content": "hi", "zzz": "x"}]},
     "messages[0].zzz: unknown field; allowed fields: role, content, name, tool_call_id, tool_calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"name": "a", "zzz": 1}]}]},
     "messages[0].tool_calls[0].zzz: unknown field; allowed fields: id, type, function, name, arguments"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object", "zzz": {}}},
     "response_format.zzz: unknown field; allowed fields: type, json_schema"),
    # A tool is judged in the one shape it is in (OpenAI's has "function"), not in both.
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "a", "paramters": {}}]},
     "tools[0].paramters: unknown field; did you mean 'parameters'?"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": ""}}]},
     "tools[0].function.name: String should have at least 1 character (got '')"),
    ({"messages": ["hi"]}, "messages[0]: Input should be a JSON object (got 'hi')"),
])
def test_nested_problems_name_what_is_allowed_there(inputs, said):
    with pytest.raises(InvalidInput) as info:
        parse_inputs(inputs)
    assert info.value.message == said


def test_raw_and_lora_accepted_with_messages():
    inputs = parse_inputs({"messages": [{"role": "user", "content": "u"}], "raw": True, "lora": "abc"})
    assert inputs.raw and inputs.lora == "abc"


@pytest.mark.parametrize("field,bad,good_edges", [
    ("temperature", [-0.1, 5.01], [0, 5]),
    ("top_p", [-0.01, 2.01], [0, 2]),
    ("top_k", [0, 51], [1, 50]),
    ("seed", [0, 10000000000], [1, 9999999999]),
    ("repetition_penalty", [-0.1, 2.1], [0, 2]),
    ("frequency_penalty", [-0.1, 2.1], [0, 2]),
    ("presence_penalty", [-0.1, 2.1], [0, 2]),
    ("max_tokens", [0, -5], [1, 100000]),
])
def test_bounds(field, bad, good_edges):
    for value in good_edges:
        assert getattr(parse_inputs({"prompt": "x", field: value}), field) == value
    for value in bad:
        message = err({"prompt": "x", field: value})
        assert message.startswith(f"{field}: ") and repr(value) in message


def test_bound_errors_say_what_is_allowed():
    assert err({"prompt": "x", "temperature": 7}) == "temperature: Input should be less than or equal to 5 (got 7)"
    assert "greater than or equal to 1" in err({"prompt": "x", "top_k": 0})


def test_wrong_types_named():
    assert err({"prompt": "x", "max_tokens": "lots"}).startswith("max_tokens: ")
    assert err({"prompt": 5}).startswith("prompt: ")
    assert err({"prompt": "x", "stream": "maybe"}).startswith("stream: ")


def test_unknown_field_refused_by_name_with_hint():
    assert err({"prompt": "x", "max_token": 5}) == "max_token: unknown field; did you mean 'max_tokens'?"
    assert err({"prompt": "x", "temprature": 1}).endswith("did you mean 'temperature'?")
    assert err({"prompt": "x", "zzz": 1}).startswith("zzz: unknown field; allowed fields: ")


def test_image_refused_with_no_vision_message():
    for shape in ({"prompt": "x"}, {"messages": [{"role": "user", "content": "x"}]}):
        message = err({**shape, "image": [1, 2, 3]})
        assert message.startswith("image: this model has no vision")


@pytest.mark.parametrize("data,start", [
    ({"prompt": ""}, "prompt: String should have at least 1 character"),
    ({"messages": []}, "messages: List should have at least 1 item"),
    ({}, "inputs: 'prompt' (a string) or 'messages'"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "inputs: give either"),
    ({"prompt": "x" * 131073}, "prompt: String should have at most 131072 characters"),
    ({"messages": [{"role": "user", "content": "x" * 131073}]}, "messages[0].content: String should have at most"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role: role must be one of system, user"),
    ({"messages": [{"role": "user"}]}, "messages[0].content: Field required"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra: unknown field"),
    ({"prompt": "x", "tools": []}, "tools: only accepted with 'messages'"),
    ({"prompt": "x", "lora": ""}, "lora: String should have at least 1 character"),
])
def test_refusals(data, start):
    assert err(data).startswith(start)


def test_not_an_object():
    with pytest.raises(InvalidInput, match="must be a JSON object.*got list"):
        parse_inputs(["prompt"])


def test_prompt_at_max_length_is_fine():
    assert len(parse_inputs({"prompt": "x" * 131072}).prompt) == 131072


def test_tool_shapes_both_validated():
    flat = {"name": "get_weather", "description": "d", "parameters": {"type": "object", "properties": {}}}
    nested = {"type": "function", "function": flat}
    inputs = parse_inputs({"messages": [{"role": "user", "content": "x"}], "tools": [flat, nested]})
    assert len(inputs.tools) == 2
    assert "tools[0]" in err({"messages": [{"role": "user", "content": "x"}], "tools": [{"description": "no name"}]})


def test_response_format_shape():
    assert parse_inputs({"prompt": "x", "response_format": {"type": "json_object"}}).response_format.type == "json_object"
    assert err({"prompt": "x", "response_format": {"type": "xml"}}).startswith("response_format.type: ")
