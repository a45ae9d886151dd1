# dimcli developer commands. `make demo` and `make test` work on a fresh clone: both create
# .venv and install the project with its dev extra when needed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup test test-slow test-all demo lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/dim demo

lint: $(STAMP)
	$(BIN)/ruff check dimcli tests bench
	$(BIN)/ruff format --check dimcli tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format dimcli tests bench
	$(BIN)/ruff check --fix dimcli tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
