# Two commands for a fresh machine: `make run` (the whole job end to end) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shopguide-installed
PYTEST_ARGS ?=

.PHONY: install run test lint serve clean

# torch first, pinned to the CPU build: any looser requirement resolved later would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/shopguide run

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

serve: install
	$(VENV)/bin/shopguide serve

clean:
	rm -rf .shopguide
