# fastcell: every common job is a target. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastcell-installed
# The GPU build of FAISS where an NVIDIA GPU is visible, the CPU build elsewhere (exactly one per env).
FAISS := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo faiss-gpu || echo faiss-cpu)
DEMO_DIR ?= demo

.PHONY: setup test test-fast demo bench gpu-check lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q "nvidia-dali-cuda130>=2.0" "$(FAISS)>=1.8"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -c "import fastcell, torch, nvidia.dali, faiss, webdataset; print('fastcell', fastcell.__version__, '| torch', torch.__version__, '| faiss', faiss.__version__)"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	bash scripts/demo.sh $(DEMO_DIR)

bench: setup
	$(BIN)/python bench/run_all.py

gpu-check: setup
	$(BIN)/python bench/gpu_check.py

lint: setup
	$(BIN)/ruff check fastcell tests bench

format: setup
	$(BIN)/ruff format fastcell tests bench

clean:
	rm -rf $(DEMO_DIR) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find shards -mindepth 1 ! -name README.md -exec rm -rf {} +
