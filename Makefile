# megatron-mesh: `make demo` and `make test` set everything up in .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
HF5    := $(VENV)/transformers5

.PHONY: setup test test-fast lint demo stats clean gpu-check gpu-check-tiny

setup: $(STAMP)

$(STAMP): setup.py requirements/cpu.txt requirements/megatron.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements/cpu.txt
	$(PIP) install -q --no-deps --ignore-requires-python -r requirements/megatron.txt
	$(PIP) install -q --no-deps -e .
	touch $@

# transformers 5 beside the pinned 4.x, for the export-compatibility test only
$(HF5)/.installed: requirements/transformers5.txt $(STAMP)
	rm -rf $(HF5)
	$(PIP) install -q --target $(HF5) -r requirements/transformers5.txt
	touch $@

# one worker per core (pytest-xdist); a test file's tests stay on one worker, so module fixtures
# (a trained checkpoint) are built once
test: setup lint $(HF5)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile $(PYTEST_ARGS)

# the inner loop: unit tests only, no torchrun or tool subprocesses (tests marked slow)
test-fast: setup
	$(PY) -m pytest -q -n auto -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check megatron_mesh tools tests docker

demo: setup
	$(PY) tools/demo.py

# Qualify a GPU machine (tools/gpu_check.py): run where CUDA torch, megatron-core 0.19.2 and this
# package's requirements are installed (the Docker image), not in the CPU .venv. Exit 1 on any
# failed check; report in runs/gpu-check/. gpu-check-tiny is the CPU stand-in CI runs.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --output runs/gpu-check $(GPU_CHECK_ARGS)

gpu-check-tiny: setup
	$(PY) tools/gpu_check.py --tiny --output runs/gpu-check-tiny

stats: setup
	$(PY) tools/model_stats.py --config configs/pythia-1.4b-4+8R2+4-mesh.yml

clean:
	rm -rf $(VENV) build *.egg-info
