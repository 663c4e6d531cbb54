# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The llama-cpp-python this environment builds (pyproject.toml states the oldest that works).
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36

# llama.cpp compiles for this CPU (-march=native), except for AMX: its AMX kernels die with
# SIGILL on virtual machines that advertise AMX without giving guests working tiles (seen on
# this project's CI machines; llama.cpp issues #28328, #28756). On other architectures the
# flags do not exist and nothing is changed. Set CMAKE_ARGS yourself for CUDA, Metal, ...
# LLAVA_BUILD=OFF: the multimodal library (and llama.cpp's common + HTTP code it pulls in) is
# never used here, and skipping it halves the build.
CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
CMAKE_ARGS += -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
endif
export CMAKE_ARGS

# pip's wheel cache ignores CMAKE_ARGS (a wheel built with other flags would be reused), so the
# llama-cpp-python wheel is built once into a wheelhouse of its own, keyed by version and flags,
# and shared by every clone on this machine; the install test reuses it.
WHEELHOUSE ?= $(HOME)/.cache/localgemma/wheels/$(shell printf '%s %s' '$(LLAMA_CPP_PYTHON)' '$(CMAKE_ARGS)' | cksum | cut -d' ' -f1)
export LOCALGEMMA_WHEELHOUSE := $(WHEELHOUSE)

.PHONY: run test test-fast bench bench-peer bench-defaults clean

# llama-cpp-python compiles llama.cpp (about 5-10 minutes on 2 cores, once per machine).
$(WHEELHOUSE)/.built:
	mkdir -p $(WHEELHOUSE)
	$(PYTHON) -m pip wheel --quiet --no-deps --no-cache-dir '$(LLAMA_CPP_PYTHON)' -w $(WHEELHOUSE)
	touch $@

$(STAMP): pyproject.toml setup.py $(WHEELHOUSE)/.built
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps --no-index --find-links $(WHEELHOUSE) '$(LLAMA_CPP_PYTHON)'
	$(BIN)/python -m pip install --quiet -e '.[server,test,clients]'
	touch $(STAMP)

# The main job: per-request LoRA on the embedded Gemma 3 270M. A raw completion streamed as it
# generates; then the example adapter (examples/, a PEFT folder as `save_pretrained` writes it)
# is registered (once: --exist-ok) and one question is asked without and with it.
EXAMPLE_ADAPTER := examples/adapters/gemma-3-270m-pirate
DEMO := Question: What is the capital of Japan?\nAnswer:
run: $(STAMP)
	$(BIN)/localgemma run --stream --temperature 0 --max-tokens 48 \
		--raw "The three most important inventions of the twentieth century are"
	@echo
	$(BIN)/localgemma finetune create --exist-ok --description "answers like a pirate (examples/)" \
		@localgemma/google/gemma-3-270m pirate $(EXAMPLE_ADAPTER)
	@printf '\n--- without the adapter ---\n'
	$(BIN)/localgemma run --raw --temperature 0 --max-tokens 40 "$$(printf '$(DEMO)')"
	@printf '\n--- with --lora pirate ---\n'
	$(BIN)/localgemma run --raw --temperature 0 --max-tokens 40 --lora pirate "$$(printf '$(DEMO)')"

test: $(STAMP)
	$(BIN)/python -m pytest

# The fast layer: no model is loaded (tests/conftest.py enforces it), seconds in all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e and not install"

# Bytecode first, as installing a wheel writes it: an editable install run with
# PYTHONDONTWRITEBYTECODE (this machine sets it) would compile every module at each cold start.
bench: $(STAMP)
	$(BIN)/python -m compileall -q localgemma convert models
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/bench_batch.py
	$(BIN)/python bench/bench_peer.py

# The side-by-side with llama-server alone (built with this Makefile's CMAKE_ARGS, as above).
bench-peer: $(STAMP)
	$(BIN)/python -m compileall -q localgemma convert models
	$(BIN)/python bench/bench_peer.py

# The measurement behind serve's defaults (threads x --parallel), on this machine.
bench-defaults: $(STAMP)
	$(BIN)/python -m compileall -q localgemma convert models
	$(BIN)/python bench/bench_defaults.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
