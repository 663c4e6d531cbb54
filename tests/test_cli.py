"""The `localgemma` command, in-process through click's CliRunner."""

import json

import pytest
from click.testing import CliRunner

from localgemma.cli import main

pytestmark = pytest.mark.e2e


@pytest.fixture
def cli(embedded_gguf):
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(main, list(args), input=input, catch_exceptions=False)

    return invoke


def test_run_json_prints_the_whole_result(cli):
    result = cli("run", "The capital of France is", "--raw", "--temperature", "0", "--max-tokens", "5", "--json")
    assert result.exit_code == 0
    out = json.loads(result.output)
    assert set(out) == {"response", "usage"} and out["usage"]["completion_tokens"] == 5
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 5


def test_run_text_and_stream_print_the_same(cli):
    args = ("run", "Where is New York?", "--temperature", "0.8", "--seed", "11", "--max-tokens", "20")
    plain, streamed = cli(*args), cli(*args, "--stream")
    assert plain.exit_code == streamed.exit_code == 0
    assert plain.output == streamed.output and plain.output.strip()


def test_run_input_from_stdin(cli):
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    result = cli("run", "--input", "-", "--json", input=json.dumps(request))
    assert result.exit_code == 0 and json.loads(result.output)["usage"]["completion_tokens"] <= 3


def test_stream_json_is_one_chunk_per_line(cli):
    result = cli("run", "hi", "--stream", "--json", "--max-tokens", "4", "--temperature", "0")
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines[-1]["response"] == "" and lines[-1]["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize("args,message", [
    (("run", "x", "--temperature", "9"), "Error: temperature: Input should be less than or equal to 5 (got 9.0)\n"),
    (("run", "x", "--model", "@cf/nope/x"), "Error: model '@cf/nope/x' is unknown"),
    (("run", "--input", "-"), "Error: Invalid value for --input: not JSON"),
])
def test_errors_are_one_line_and_nonzero(cli, args, message):
    result = CliRunner().invoke(main, list(args), input="{oops")
    assert result.exit_code != 0
    assert result.output.startswith(message) or message in result.output
    assert "Traceback" not in result.output


def test_unknown_field_in_input_file(cli, tmp_path):
    path = tmp_path / "req.json"
    path.write_text(json.dumps({"prompt": "x", "max_token": 3}))
    result = CliRunner().invoke(main, ["run", "--input", str(path)])
    assert result.exit_code == 1 and result.output == "Error: max_token: unknown field; did you mean 'max_tokens'?\n"


def test_models_path_and_list(cli, embedded_gguf):
    assert cli("models", "path").output.strip() == str(embedded_gguf)
    listing = json.loads(cli("models", "list", "--json").output)
    assert [row["id"] for row in listing if row["default"]] == ["@localgemma/google/gemma-3-270m"]


def test_info_reports_backend_and_threads(cli):
    facts = json.loads(cli("info", "--json").output)
    assert facts["backend"] in ("CPU", "Metal", "GPU") and facts["threads"] >= 1
    assert "llama_cpp_python" in facts and isinstance(facts["simd"], list)


def test_chat_keeps_history_and_resets(cli, monkeypatch):
    seen = []
    import localgemma.runtime as runtime

    real = runtime.run

    def spy(model, inputs):
        seen.append([m["content"] for m in inputs["messages"]])
        return real(model, {**inputs, "max_tokens": 3, "temperature": 0})

    monkeypatch.setattr(runtime, "run", spy)
    result = cli("chat", "--system", "Be kind.", input="hello\nagain\n/reset\nfresh\n/exit\n")
    assert result.exit_code == 0
    assert seen[0] == ["Be kind.", "hello"]
    assert seen[1][:3] == ["Be kind.", "hello", seen[1][2]] and seen[1][-1] == "again" and len(seen[1]) == 4
    assert seen[2] == ["Be kind.", "fresh"]
    assert "(conversation reset)" in result.output
