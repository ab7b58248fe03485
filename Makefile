# The two quickstart commands:  `make run` (set up + the main job) and `make test`.
# Everything lives in a local virtual environment (.venv), created on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint bench install clean slurm-up

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

## The main job: a toy 2D density run (a few minutes on a laptop CPU); prints
## its metrics and writes a picture of the learned density under runs/.
run: $(STAMP)
	$(BIN)/iresflow train $(ARGS)

## Lint (ruff) and type check (mypy): configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy

## The whole test suite (the slow tests included) after the lint, as CI runs it.
test: lint
	$(BIN)/python -m pytest -ra $(ARGS)

## The quick subset, for the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow" $(ARGS)

## A one-node SLURM cluster on this machine (root; installs Debian's slurm-wlm and munge), as the
## scheduler tests start it: to try examples/slurm/*.sbatch by hand.
slurm-up:
	scripts/slurm-up

## The performance harness (writes benchmarks/results/).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
