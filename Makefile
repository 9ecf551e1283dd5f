# tilechain: `make run` and `make test` work on a fresh clone (they set everything up).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup models protos docs up down run test bench clean

setup: $(STAMP) models

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The default local models: real architectures, small random weights (skips existing files).
models: $(STAMP)
	$(PY) -m tilechain.build_models

# Regenerate the committed stubs (tests fail when they are stale).
protos: $(STAMP)
	$(PY) -m tilechain.protos

# Regenerate the stage table in README.md from the stage classes.
docs: $(STAMP)
	$(PY) -m tilechain.docs

up: $(STAMP) models
	$(VENV)/bin/tilechain up

down:
	@if [ -x $(VENV)/bin/tilechain ]; then $(VENV)/bin/tilechain down; fi

# Set up, start the stack, run the default chain, print where its image went.
run: up
	$(VENV)/bin/tilechain run examples/chains/default.json

test: $(STAMP) models
	$(PY) -m pytest -q

bench: $(STAMP) models
	$(PY) bench/bench_chain.py
	$(PY) bench/bench_upscale.py
	$(PY) bench/bench_diffusion.py
	$(PY) bench/bench_malloc.py

clean: down
	rm -rf $(VENV) var
