# Quick start on a CPU-only machine: `make demo`, then `make test`.
# Both create .venv with the CPU build of torch 2.13.0 and the package installed editable.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m osft_kernels.demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

# kernel benchmarks (minutes on CPU): benchmarks/results/<device>.md, .png and .json
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet torch==2.13.0 -e ".[bench]"
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python -m pytest benchmarks/ --benchmark-only -rs -p no:cacheprovider --benchmark-json=$(VENV)/benchmark.json
	$(BIN)/python -m benchmarks.report $(VENV)/benchmark.json
