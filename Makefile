# The two entry points of README.md. Both set up .venv first (once, and again when
# pyproject.toml changes): torch first, from TORCH, so that pip never resolves another
# build of it; then regdial, editable, with its development tools.
#
#   make demo   set up, then tune digits-small (the main job on its built-in default)
#   make test   set up, then lint (ruff), format check, type check (mypy) and test (pytest, two
#               processes), all but the end-to-end tests of tens of seconds each (marked slow)
#   make test-slow  those end-to-end tests: processes killed, terminals and workers sharing a
#               study, torchrun (CI runs both)

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow lint setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/regdial tune --task digits-small

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -n 2 -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -n 2 -m slow

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
