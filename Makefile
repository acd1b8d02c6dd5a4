# Quick start on a CPU-only machine: `make demo`, then `make test`.
# Both create .venv with the CPU build of torch 2.13.0 and the package installed editable.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m osft_kernels.demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q
