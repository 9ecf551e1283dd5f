# tilechain: `make run` and `make test` work on a fresh clone (they set everything up).
# Every install comes from the committed locks in requirements/ (exact versions, with hashes);
# pyproject.toml holds the ranges, and `make lock` recompiles the locks from them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/dev.lock
STAMP := $(VENV)/.installed
# The slim environment (no torch, no diffusers): what the slim image runs; tests/test_slim.py
# serves a model-free chain from it.
SLIM_VENV := var/venv-slim
SLIM_STAMP := $(SLIM_VENV)/.installed

.PHONY: setup models protos docs lock up down run test bench clean

setup: $(STAMP) $(SLIM_STAMP) models

# A new venv each time the lock changes, so that it holds exactly the locked set; the project
# itself goes in without resolving anything (its build backend is in the lock too).
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m tilechain.lock --check-installed $(LOCK)
	touch $(STAMP)

$(SLIM_STAMP): pyproject.toml requirements/slim.lock
	rm -rf $(SLIM_VENV)
	$(PYTHON) -m venv $(SLIM_VENV)
	$(SLIM_VENV)/bin/python -m pip install -q --require-hashes -r requirements/slim.lock
	$(SLIM_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(SLIM_VENV)/bin/python -m tilechain.lock --check-installed requirements/slim.lock
	touch $(SLIM_STAMP)

# Recompile requirements/*.lock from pyproject.toml (after changing a range, or to take newer
# releases within the ranges); then `make test`. Reaches the package registry.
lock: $(STAMP)
	$(PY) -m tilechain.lock

# The default local models: real architectures, small random weights (skips existing files).
models: $(STAMP)
	$(PY) -m tilechain.build_models

# Regenerate the committed stubs (tests fail when they are stale).
protos: $(STAMP)
	$(PY) -m tilechain.protos

# Regenerate the stage table in README.md from the stage classes.
docs: $(STAMP)
	$(PY) -m tilechain.docs

up: setup
	$(VENV)/bin/tilechain up

down:
	@if [ -x $(VENV)/bin/tilechain ]; then $(VENV)/bin/tilechain down; fi

# Set up, start the stack, run the default chain, print where its image went.
run: up
	$(VENV)/bin/tilechain run examples/chains/default.json

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_chain.py
	$(PY) bench/bench_upscale.py
	$(PY) bench/bench_diffusion.py
	$(PY) bench/bench_malloc.py
	$(PY) bench/bench_s3.py

clean: down
	rm -rf $(VENV) var
