# Two commands set everything up: `make demo` and `make test`. Both create .venv as needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: test test-real test-memory lint demo demo-multi bench load services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever the package metadata changes.
$(VENV)/.installed-%: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[$*]'
	touch $@

services:
	bash tests/tools/ensure_services.sh

# The suite runs twice: PostgreSQL + Redis, then SQLite + the in-memory layer.
test: $(VENV)/.installed-test services lint test-real test-memory

test-real: $(VENV)/.installed-test
	CR_TEST_STACK=real $(BIN)/pytest $(PYTEST_ARGS)

test-memory: $(VENV)/.installed-test
	CR_TEST_STACK=memory $(BIN)/pytest -m "not faults and not browser" $(PYTEST_ARGS)

# ruff everywhere; mypy strict on channel_registry/ (configured in pyproject.toml).
lint: $(VENV)/.installed-test
	$(BIN)/ruff check channel_registry demo_site tests benchmarks noxfile.py
	$(BIN)/mypy

demo: $(VENV)/.installed-demo
	PORT=$(PORT) bash demo_site/run.sh

demo-multi: $(VENV)/.installed-demo
	PORT=$(PORT) bash demo_site/run.sh multi

bench: $(VENV)/.installed-test $(VENV)/.installed-bench services
	$(BIN)/python -m benchmarks.run

load: $(VENV)/.installed-test services
	$(BIN)/python -m benchmarks.load

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
