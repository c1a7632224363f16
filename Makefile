# Two entry points for a fresh machine: `make serve` and `make test`. Both create the virtual
# environment and install the project into it first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
# A pinned torch first, so pip does not pick a different build while resolving the rest. Set
# TORCH='torch==X --index-url https://download.pytorch.org/whl/cu126' for another build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install serve test lint format

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test,train]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/unet-serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
