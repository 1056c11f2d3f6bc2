# Two commands set everything up: `make demo` and `make test`. Both create .venv as needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: docs niced test test-real test-real-parallel test-timing test-memory test-js test-wheel matrix matrix-all lint demo demo-multi demo-uvicorn bench load services clean

# uv (from PyPI) installs the same packages as pip in a fraction of its time, byte-compiling included
# (PYTHONDONTWRITEBYTECODE, set on some machines, would make every process compile what it imports).
# It reads UV_INDEX_URL, not pip.conf: behind a mirror, set it, or use `make INSTALLER=pip ...`.
INSTALLER ?= uv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(if $(filter uv,$(INSTALLER)),uv,--upgrade pip)

# Reinstall whenever the package metadata changes.
$(VENV)/.installed-%: setup.cfg pyproject.toml | $(BIN)/python
	if [ "$(INSTALLER)" = uv ] && [ -x $(BIN)/uv ]; then \
		$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -e '.[$*]'; \
	else $(BIN)/python -m pip install -q -e '.[$*]'; fi
	touch $@

services:
	bash tests/tools/ensure_services.sh

# `make test` in two phases. First, side by side (output kept per target): lint, the real-services
# suite without the timing tests on $(WORKERS) pytest workers (this venv: Python 3.11 + Django 5.2),
# the in-memory suite on Python 3.13 + Django 6.1 (`make matrix`, noxfile.py), the JS client's tests,
# the built wheel and the docs. Then, alone, the timing tests (marker timing): they bound bystanders' p99, a
# server's RSS and Redis round trips, which mean nothing next to other suites. `make test-memory` runs
# the in-memory suite in this venv; `make matrix-all` on every supported Python x Django.
test: $(VENV)/.installed-test services
	$(MAKE) --no-print-directory -j 3 --output-sync=target test-real-parallel test-js niced
	$(MAKE) --no-print-directory test-timing

# The other steps at a lower priority: they take the CPU the real-services suite leaves idle (it mostly
# waits on sockets and heartbeats) instead of slowing its servers down. The matrix beside it at normal
# priority took its real-services leg from 260 s to 356 s; niced, the matrix ends about when it does.
niced:
	nice -n 10 $(MAKE) --no-print-directory -j 4 --output-sync=target lint matrix test-wheel docs

# Most real-services tests wait on sockets, heartbeats and server processes rather than compute:
# four workers keep two CPUs busy. loadgroup hands tests out one at a time, in the order
# tests/conftest.py sets (the longest first), and the browser tests to one worker (conftest.py).
WORKERS ?= 4
TIMING := timing

# The whole real-services suite in one process (what test-real-parallel + test-timing split).
test-real: $(VENV)/.installed-test
	CR_TEST_STACK=real $(BIN)/pytest $(PYTEST_ARGS)

test-real-parallel: $(VENV)/.installed-test
	CR_TEST_STACK=real $(BIN)/pytest -n $(WORKERS) --dist loadgroup -m "not ($(TIMING))" $(PYTEST_ARGS)

test-timing: $(VENV)/.installed-test
	CR_TEST_STACK=real $(BIN)/pytest -m "$(TIMING)" $(PYTEST_ARGS)

test-memory: $(VENV)/.installed-test
	CR_TEST_STACK=memory $(BIN)/pytest -m "not faults and not browser and not abuse" $(PYTEST_ARGS)

# ruff everywhere; mypy strict on channel_registry/ (pyproject.toml); tsc over the JS client (tsconfig.json).
# Node's own test runner over the client's pure parts (backoff, SSE parsing, state machine).
test-js:
	bash tests/tools/node_tests.sh

# Python 3.13 + Django 6.1, in-memory suite; a missing Python is skipped.
matrix: $(VENV)/.installed-test
	$(BIN)/nox -s ci

# Every combination of noxfile.COMBINATIONS (about a minute each).
matrix-all: $(VENV)/.installed-test
	$(BIN)/nox -s memory

# sdist + wheel, twine check, the wheel in a new venv (newest Python + Django), the quick start test.
test-wheel: $(VENV)/.installed-test
	$(BIN)/nox -s wheel

lint: $(VENV)/.installed-test
	$(BIN)/ruff check channel_registry demo_site tests benchmarks docs noxfile.py
	$(BIN)/mypy
	bash tests/tools/typecheck_js.sh

# The Sphinx site (docs/, furo theme) into docs/_build/html; any warning fails it. The test extra
# carries the docs extra's packages, so `make test` installs nothing while suites run.
docs: $(VENV)/.installed-test
	$(BIN)/sphinx-build -q -W --keep-going -b html docs docs/_build/html

demo: $(VENV)/.installed-demo
	PORT=$(PORT) bash demo_site/run.sh

demo-multi: $(VENV)/.installed-demo
	PORT=$(PORT) bash demo_site/run.sh multi

# The same demo on uvicorn instead of daphne (SERVER=uvicorn also works with demo-multi).
demo-uvicorn: $(VENV)/.installed-demo
	PORT=$(PORT) SERVER=uvicorn bash demo_site/run.sh

bench: $(VENV)/.installed-test $(VENV)/.installed-bench services
	$(BIN)/python -m benchmarks.run

# Five setups of the library (library / stock / pub-sub layer, mapping / groups, daphne / uvicorn)
# and four yardsticks without it (raw websockets, plain Channels in memory with and without the DB
# hop, plain Channels + Redis groups) on one server process each, then 10,000 idle sockets.
# Not part of `make test`. LOAD_ARGS="--setup library --profile" passes options.
LOAD_ARGS ?=
load: $(VENV)/.installed-test $(VENV)/.installed-bench services
	$(BIN)/python -m benchmarks.load $(LOAD_ARGS)

clean:
	rm -rf $(VENV) .nox build docs/_build *.egg-info .pytest_cache .ruff_cache .mypy_cache
