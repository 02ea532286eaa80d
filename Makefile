# transformer-math: `make run` (set up, default sweep, report) and `make test` (set up, tests).
#
# The venv sees the system site-packages so that a GPU node's own CUDA build of torch is used;
# torch is installed only where none is importable. TORCH_CPU names what is installed then: on this
# project's machines `torch==2.13.0` resolves to a CPU wheel on local disk; from plain PyPI on Linux that
# pin is the multi-GB CUDA build, so elsewhere choose the CPU build with
#   make test TORCH_CPU="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# DeepSpeed is installed after torch without build isolation and without compiling its ops
# (DS_BUILD_OPS=0); ops it JIT-compiles are cached in .torch_extensions.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
SWEEP ?= sweeps/cpu-smoke.yaml
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export DS_BUILD_OPS := 0

.PHONY: setup run test lint clean

$(VENV)/.ready: pyproject.toml
	@echo "setup: virtual environment $(VENV) (sees the system site-packages)"
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@echo "setup: pip, setuptools, wheel"
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@$(PY) -c "import torch; print('setup: torch', torch.__version__, 'is already importable: kept')" 2>/dev/null \
		|| { echo "setup: installing $(TORCH_CPU) (set TORCH_CPU to choose another build)"; \
		     $(PY) -m pip install --quiet $(TORCH_CPU); }
	@$(PY) -c "import deepspeed" 2>/dev/null && echo "setup: deepspeed is already importable: kept" \
		|| { echo "setup: installing deepspeed without compiling its ops (DS_BUILD_OPS=0)"; \
		     $(PY) -m pip install --quiet --no-build-isolation deepspeed; }
	@echo "setup: transformer-math and its dependencies (transformers, peft, pandas, pydantic, rich, ...; pytest, ruff)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@
	@echo "setup: done ($(VENV))"

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
