# transformer-math: `make run` (set up, default sweep, report) and `make test` (set up, tests).
#
# The venv sees the system site-packages so that a GPU node's own CUDA build of torch is used;
# the CPU wheel is installed only where no torch is importable (a bare `torch` requirement would
# pull a multi-GB CUDA build). DeepSpeed is installed after torch without build isolation and
# without compiling its ops (DS_BUILD_OPS=0); ops it JIT-compiles are cached in .torch_extensions.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
SWEEP ?= sweeps/cpu-smoke.yaml
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export DS_BUILD_OPS := 0

.PHONY: setup run test lint clean

$(VENV)/.ready: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -c "import deepspeed" 2>/dev/null || $(PY) -m pip install --quiet --no-build-isolation deepspeed
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.ready

run: setup
	$(VENV)/bin/tmath sweep $(SWEEP) --resume
	$(VENV)/bin/tmath report results/$(basename $(notdir $(SWEEP)))

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check formulas models harness tests

clean:
	rm -rf $(VENV) .torch_extensions .pytest_cache .ruff_cache
