# Two commands for a fresh machine: `make run` (the whole job end to end) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shopguide-installed
PYTEST_ARGS ?=
PORT ?= 8000
# Where pip finds torch. Empty = the configured index (here it holds the CPU build). On a machine whose index would
# resolve torch to a multi-GB CUDA build, point it at PyTorch's CPU wheel index, e.g.
#   make run TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=

.PHONY: install run announce test check lint serve clean python-version

python-version:
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else \
		f"shopguide needs Python >= 3.11; $(PYTHON) is {v.major}.{v.minor}: run make PYTHON=python3.11 ...")'

# torch first, pinned to the CPU build: any looser requirement resolved later would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | python-version
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: announce install
	$(VENV)/bin/shopguide run --port $(PORT)

announce:
	@echo "make run: installs into $(VENV) (first time ~4 min), runs the features and retrain DAGs (~25-30 min on 2 cores)"
	@echo "          and serves the new champion on 127.0.0.1:$(PORT) (make run PORT=N to change)"

# Static checks first (seconds): style, formatting, the import-layer contracts and mypy's types, all configured
# in pyproject.toml.
check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# The production-profile tests (marker `prod`: the profile's processes on this machine's PostgreSQL and Redis, two
# DAG runs on its Celery worker; ~6 min alone on 2 cores, ~8.5 beside the rest) run in a
# second pytest process beside the rest, which takes the other core; their report follows the main one. Exit status
# 5 is pytest's "nothing selected" (PYTEST_ARGS naming other tests).
test: check
	@mkdir -p .shopguide
	@$(VENV)/bin/python -m pytest -m prod -p no:cacheprovider $(PYTEST_ARGS) > .shopguide/test-prod.log 2>&1 & \
	prod=$$!; trap 'kill -INT $$prod 2>/dev/null' INT TERM; \
	$(VENV)/bin/python -m pytest -m "not prod" $(PYTEST_ARGS); main=$$?; \
	wait $$prod; status=$$?; \
	echo "=== production profile (pytest -m prod; full log in .shopguide/test-prod.log) ==="; \
	tail -n 60 .shopguide/test-prod.log; \
	[ $$main -eq 0 ] && { [ $$status -eq 0 ] || [ $$status -eq 5 ]; }

lint: check

serve: install
	$(VENV)/bin/shopguide serve

clean:
	rm -rf .shopguide
