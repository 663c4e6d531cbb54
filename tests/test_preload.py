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
