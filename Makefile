# The single entry point: set-up, training, tests, benchmarks. The commands run the `attnres` console
# script's code as `python -m lightning_modules` (the library's own `python -m attnres` serves `info`).
# Inside an active virtual environment it uses that; otherwise it creates .venv with
# --system-site-packages so a machine's own torch (CPU or CUDA) is reused.
SHELL := /bin/bash
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

.PHONY: install test test-gpu train bench bench-ops bench-scaling lint clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	python3 -m venv --system-site-packages $(VENV)

install: $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)  ## create .venv, install torch if missing, build attnres._C
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	@# --no-build-isolation builds with this environment's tools (so with its torch): install them first.
	@# [test] = [dev] (CPU tools) + the independent references the CPU tests compare against (fla, triton)
	$(PY) -m pip install -q "setuptools>=77" wheel ninja "pybind11>=2.12"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@$(PY) -m attnres info

test: install  ## install, then run the test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: install  ## rebuild with the CUDA kernels (ATTNRES_CUDA=1), then run the GPU tests
	ATTNRES_CUDA=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m pytest -q tests/test_ops_cuda.py tests/gpu $(PYTEST_ARGS)

train: install  ## install, then train configs/default.yaml (CONFIG=... to change)
	$(PY) -m lightning_modules fit -c $(CONFIG)

bench-ops: install  ## depth-attention op benchmark: table + JSON under benchmarks/results/
	$(PY) -m lightning_modules bench ops

bench: install  ## end-to-end benchmark (GPU): table + JSON under benchmarks/results/
	$(PY) -m lightning_modules bench e2e

bench-scaling: install  ## weak scaling over FSDP / PP x FSDP layouts (every GPU here): table + JSON
	$(PY) -m lightning_modules bench scaling

lint:  ## ruff
	$(PY) -m ruff check .

clean:  ## remove build outputs
	rm -rf build dist attnres/*.so attnres/_build_info.json *.egg-info
