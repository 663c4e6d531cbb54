"""A cold start reads the model's weights on a thread while Python imports the rest
(localgemma.preload). What a user sees must not change: the same answer, the same errors,
nothing left loaded after a refusal, llama.cpp's log only when asked for."""

import json
import os
import subprocess
import sys

import pytest

from localgemma.__main__ import model_flag


@pytest.mark.parametrize("args,expected", [
    (["run", "hi"], (True, None)),
    (["run", "--model", "m.gguf", "hi"], (True, "m.gguf")),
    (["run", "-m", "@cf/google/gemma-2b-it-lora", "hi"], (True, "@cf/google/gemma-2b-it-lora")),
    (["run", "--model=m.gguf", "hi"], (True, "m.gguf")),
    (["chat", "-mm.gguf"], (True, "m.gguf")),
    (["run", "--", "--model", "x"], (True, None)),  # after --, a prompt that looks like a flag
    (["run", "--help"], (False, None)),
    (["serve", "--model", "a=b.gguf"], (False, None)),
    (["models", "list"], (False, None)),
    ([], (False, None)),
])
def test_which_commands_preload_and_which_model(args, expected):
    assert model_flag(args) == expected


# Counts the weight loads (and the thread each ran on) and the models freed before the call
# returned, then answers one request.
COLD_RUN = """
import json, sys, threading
import llama_cpp
from localgemma import weights
loads, real = [], weights.load
def counted(path, **kw):
    loads.append(threading.current_thread().name)
    return real(path, **kw)
weights.load = counted
frees, real_free = [], llama_cpp.llama_model_free
def counted_free(model):
    frees.append(1)
    return real_free(model)
llama_cpp.llama_model_free = counted_free
import localgemma
from localgemma import preload
inputs = json.loads(sys.argv[2])
try:
    answer = localgemma.run(model=sys.argv[1], inputs=inputs)["response"]
except localgemma.LocalGemmaError as exc:
    answer = "refused: " + exc.message
print(json.dumps({"answer": answer, "loads": loads, "left": len(preload._pending), "freed": len(frees)}))
"""


def cold_run(path, inputs, **env):
    done = subprocess.run([sys.executable, "-c", COLD_RUN, str(path), json.dumps(inputs)], capture_output=True,
                          text=True, timeout=180, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


GREEDY = {"prompt": "The capital of France is", "raw": True, "max_tokens": 12, "temperature": 0}


@pytest.mark.e2e
def test_a_cold_run_loads_the_weights_once_on_the_preload_thread_and_answers_the_same(embedded_gguf):
    cold = cold_run(embedded_gguf, GREEDY)
    # LOCALGEMMA_VERBOSE set (to anything) turns the preload off: the load happens in Engine.
    plain = cold_run(embedded_gguf, GREEDY, LOCALGEMMA_VERBOSE="0")
    assert cold["loads"] == ["localgemma-preload"] and plain["loads"] == ["MainThread"]
    assert cold["answer"] == plain["answer"] and cold["answer"].strip()
    assert cold["left"] == plain["left"] == 0 and cold["freed"] == plain["freed"] == 0  # the engine keeps it


@pytest.mark.e2e
def test_a_refused_cold_run_frees_what_it_preloaded(embedded_gguf):
    refused = cold_run(embedded_gguf, {**GREEDY, "temperature": 9})
    assert refused["answer"].startswith("refused: ") and "temperature" in refused["answer"], refused
    assert refused["loads"] == ["localgemma-preload"] and refused["left"] == 0 and refused["freed"] == 1


@pytest.mark.e2e
def test_the_command_says_nothing_of_llama_cpp_unless_verbose(embedded_gguf):
    def command(**env):
        return subprocess.run([sys.executable, "-m", "localgemma", "run", "--model", str(embedded_gguf), "--raw",
                               "--max-tokens", "2", "--temperature", "0", "Hi"], capture_output=True, text=True,
                              timeout=180, env={**os.environ, **env})

    quiet, loud = command(), command(LOCALGEMMA_VERBOSE="1")
    assert quiet.returncode == loud.returncode == 0, (quiet.stderr, loud.stderr)
    assert quiet.stderr == "" and quiet.stdout.strip()
    assert "llama_model_loader" in loud.stderr and loud.stdout == quiet.stdout


def fresh(code, *args, **env):
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done


def test_localgemma_imports_llama_cpp_c_half_only_and_the_rest_on_demand():
    # localgemma.bindings: the runtime needs only the C bindings; llama-cpp-python's Python
    # half (numpy, jinja2, the chat formats) loads when something asks the package for it.
    done = fresh("""
import json, sys
import localgemma.engine, localgemma.runtime
before = sorted(m for m in ("llama_cpp.llama", "llama_cpp.llama_chat_format", "jinja2") if m in sys.modules)
import llama_cpp
from localgemma.bindings import llama_cpp as ours
from llama_cpp import LlamaGrammar
print(json.dumps({"before": before, "same": llama_cpp is ours, "Llama": llama_cpp.Llama.__module__,
                  "grammar": LlamaGrammar.__name__, "version": llama_cpp.__version__,
                  "c_api": llama_cpp.llama_model_free is sys.modules["llama_cpp.llama_cpp"].llama_model_free}))
""")
    from importlib.metadata import version

    seen = json.loads(done.stdout)
    assert seen == {"before": [], "same": True, "Llama": "llama_cpp.llama", "grammar": "LlamaGrammar",
                    "version": version("llama_cpp_python"), "c_api": True}


def test_a_llama_cpp_imported_before_localgemma_is_kept_as_it_is():
    done = fresh("""
import llama_cpp
whole = llama_cpp.__dict__.get("Llama")
from localgemma.bindings import llama_cpp as ours
import localgemma.engine
print(ours is llama_cpp and whole is not None and ours.__dict__.get("Llama") is whole)
""")
    assert done.stdout.strip() == "True"


@pytest.mark.e2e
def test_llama_cpp_python_loaded_later_does_not_make_llama_cpp_talk(embedded_gguf):
    # llama-cpp-python installs its own log handler when its logger module is imported. That
    # must happen before localgemma installs its silent one, even when the rest of the package
    # is imported after a model was loaded -- or the next load prints llama.cpp's narration.
    done = fresh("""
import sys
from localgemma.engine import Engine
Engine(sys.argv[1], n_ctx=512).close()
import llama_cpp
assert llama_cpp.Llama
Engine(sys.argv[1], n_ctx=512).close()
print("ok")
""", embedded_gguf)
    assert done.stdout.strip() == "ok" and done.stderr == ""


@pytest.mark.e2e
def test_an_engine_dropped_while_running_frees_its_weights_and_exit_leaves_them_to_the_os(embedded_gguf):
    # Freeing llama.cpp's weights takes ~60 ms that an exiting process need not wait for.
    done = fresh("""
import gc, os, sys
from localgemma.bindings import llama_cpp
real = llama_cpp.llama_model_free
def counted(model):
    os.write(1, b"freed\\n")
    return real(model)
llama_cpp.llama_model_free = counted
from localgemma.engine import Engine
dropped = Engine(sys.argv[1], n_ctx=512)
del dropped
gc.collect()
os.write(1, b"dropped\\n")
kept = Engine(sys.argv[1], n_ctx=512)
""", embedded_gguf)
    assert done.stdout.split() == ["freed", "dropped"], done.stdout


class Exited(Exception):
    pass


@pytest.fixture
def exits(monkeypatch):
    """exit_now's effects, recorded instead of done: the status, and whether atexit ran."""
    import atexit

    seen = {}

    def _exit(status):
        seen["status"] = status
        raise Exited

    monkeypatch.setattr(os, "_exit", _exit)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: seen.setdefault("atexit", True))
    return seen


@pytest.mark.parametrize("code,status,stderr", [(None, 0, ""), (0, 0, ""), (3, 3, ""), ("Error: boom", 1, "Error: boom\n")])
def test_a_finished_run_exits_with_sys_exits_status_after_the_atexit_handlers(exits, capsys, code, status, stderr):
    from localgemma.__main__ import exit_now

    with pytest.raises(Exited):
        exit_now(code)
    assert exits == {"status": status, "atexit": True} and capsys.readouterr().err == stderr


def test_a_run_that_left_a_thread_running_exits_the_normal_way(exits):
    import threading

    from localgemma.__main__ import exit_now

    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        exit_now(0)  # returns: Python's own exit waits for the thread
    finally:
        release.set()
        worker.join()
    assert exits == {}


@pytest.mark.e2e
def test_the_command_prints_all_of_the_answer_and_exits_with_its_status(embedded_gguf):
    api = cold_run(embedded_gguf, GREEDY)["answer"]
    answered = subprocess.run([sys.executable, "-m", "localgemma", "run", "--model", str(embedded_gguf), "--raw",
                               "--max-tokens", "12", "--temperature", "0", GREEDY["prompt"]],
                              capture_output=True, text=True, timeout=180)
    refused = subprocess.run([sys.executable, "-m", "localgemma", "run", "--model", str(embedded_gguf),
                              "--temperature", "9", "Hi"], capture_output=True, text=True, timeout=180)
    assert answered.returncode == 0 and answered.stdout == api + "\n", (answered.stdout, api)
    assert refused.returncode == 1 and "temperature" in refused.stderr and refused.stdout == ""
