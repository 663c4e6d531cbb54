"""Settings from LOCALGEMMA_* variables: read as pydantic-settings read them before (the name
in any case, lists and maps as JSON), flags over variables over defaults, and every bad value
refused with the variable named."""

import pytest

from localgemma.errors import InvalidInput
from localgemma.settings import current, from_environment


@pytest.fixture
def env(monkeypatch):
    def set_(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, value)
    return set_


def test_variables_in_any_case_lists_and_maps_as_json(env):
    env(localgemma_threads="3", LOCALGEMMA_VERBOSE="yes", LOCALGEMMA_CORS_ORIGINS='["https://a.example"]',
        LOCALGEMMA_MODELS='{"@cf/google/gemma-2b-it-lora": "/m/2b.gguf"}', LOCALGEMMA_MAX_BODY_MB="2.5",
        LOCALGEMMA_KV_TYPE="q8_0", LOCALGEMMA_SOMETHING_ELSE="ignored")
    s = current()
    assert (s.threads, s.verbose, s.cors_origins, s.max_body_mb, s.kv_type) == (3, True, ["https://a.example"], 2.5,
                                                                                 "q8_0")
    assert s.models == {"@cf/google/gemma-2b-it-lora": "/m/2b.gguf"}


def test_flags_win_over_variables_and_variables_over_defaults(env):
    env(LOCALGEMMA_PARALLEL="2")
    assert current().parallel == 2 and current(parallel=6).parallel == 6 and current().batch_ctx == 4096


@pytest.mark.parametrize("variable,value,named", [
    ("LOCALGEMMA_N_CTX", "32", "greater than or equal to 64"),
    ("LOCALGEMMA_KV_TYPE", "q3", "'f16', 'q8_0' or 'q4_0'"),
    ("LOCALGEMMA_PORT", "70000", "less than or equal to 65535"),
    ("LOCALGEMMA_PARALLEL", "129", "less than or equal to 128"),
    ("LOCALGEMMA_VERBOSE", "maybe", "valid boolean"),
    ("LOCALGEMMA_API_KEY", " ", "the key is empty"),
    ("LOCALGEMMA_CORS_ORIGINS", "https://a.example", "not JSON"),
    ("LOCALGEMMA_MODELS", "{", "not JSON"),
])
def test_a_bad_variable_is_refused_with_its_name_and_value(env, variable, value, named):
    env(**{variable: value})
    with pytest.raises(InvalidInput) as refused:
        current()
    assert variable in refused.value.message and named in refused.value.message and repr(value) in refused.value.message


def test_only_the_fields_variables_set_are_read():
    assert from_environment({"LOCALGEMMA_THREADS": "2", "OTHER": "x", "LOCALGEMMA_NOPE": "1"}) == {"threads": "2"}


@pytest.mark.parametrize("variable,value,flags,blamed", [
    ("LOCALGEMMA_N_CTX", "abc", ["run", "--kv-type", "q8_0", "--raw", "Hi"], "--n-ctx / LOCALGEMMA_N_CTX"),
    ("LOCALGEMMA_KV_TYPE", "q5", ["run", "--n-ctx", "512", "--raw", "Hi"], "--kv-type / LOCALGEMMA_KV_TYPE"),
    ("LOCALGEMMA_PARALLEL", "0", ["serve", "--port", "1"], "--parallel / LOCALGEMMA_PARALLEL"),
])
def test_a_bad_variable_is_blamed_on_itself_not_on_the_flag_given(env, variable, value, flags, blamed):
    """A flag's check judged the whole settings, the environment's too, and named the flag."""
    from click.testing import CliRunner

    from localgemma.cli import main

    env(**{variable: value})
    out = CliRunner().invoke(main, flags)
    assert out.exit_code != 0 and blamed in out.output and repr(value) in out.output, out.output
    assert f"Invalid value for '{flags[1]}'" not in out.output
