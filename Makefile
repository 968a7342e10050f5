# Set-up on a fresh machine: `make demo` and `make test` each build .venv on their own.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint typecheck bench proto proto-check clean

# torch is pinned and installed first so that no dependency pulls a newer build with CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/secure-fl demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check secure_fl tests benchmarks
	$(BIN)/ruff format --check secure_fl tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -m '' -p no:randomly --benchmark-only --benchmark-columns=min,median,rounds

# Regenerate (or check) secure_fl/transport/_generated from protocols/*.proto.
proto: $(STAMP)
	$(BIN)/python -m secure_fl.transport.codegen

proto-check: $(STAMP)
	$(BIN)/python -m secure_fl.transport.codegen --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .benchmarks
