# megatron-mesh: `make demo` and `make test` set everything up in .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
HF5    := $(VENV)/transformers5

.PHONY: setup test test-fast test-image lint demo stats clean gpu-check gpu-check-tiny gpu-kit

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
# failed check; report in runs/gpu-check/. gpu-check-tiny is the CPU stand-in CI runs, in .venv
# unless GPU_PYTHON names another interpreter (with megatron-core importable there).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --output runs/gpu-check $(GPU_CHECK_ARGS)

ifeq ($(origin GPU_PYTHON),file)
gpu-check-tiny: setup
	$(PY) tools/gpu_check.py --tiny --output runs/gpu-check-tiny
else
gpu-check-tiny:
	$(GPU_PYTHON) tools/gpu_check.py --tiny --output runs/gpu-check-tiny
endif

# The GPU kit: wheels of what the lent GPU image lacks (requirements/gpu-kit.txt), for Python
# 3.12 on x86-64, into .whl/ (carried by a device call: docs/benchmarks.md)
KIT_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014,--platform $(p)_x86_64)
gpu-kit: .whl/.complete
.whl/.complete: requirements/gpu-kit.txt
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp $(KIT_PLATFORMS) -d .whl -r requirements/gpu-kit.txt
	touch $@

# The second test environment: the lent GPU image's Python 3.12 and versions
# (requirements/image.txt) with the kit installed the device way and the project not installed;
# the real device command (scripts/device/gpu-check.sh --tiny), then the fast tests
PYTHON312 ?= $(shell scripts/find-python 3.12)
IMAGE_VENV ?= .venv-image
IMAGE_PY := $(IMAGE_VENV)/bin/python
test-image:
ifeq ($(PYTHON312),)
	@echo "test-image: SKIPPED: no Python 3.12 here (looked for python3.12 on PATH, pyenv's 3.12.*, /usr/bin, /usr/local/bin); set PYTHON312=/path/to/python3.12"
else
	$(MAKE) --no-print-directory gpu-kit $(IMAGE_VENV)/.installed
	rm -rf runs/image-check
	PYTHON=$(IMAGE_PY) SITE=$(IMAGE_VENV)/kit OUT=runs/image-check bash scripts/device/gpu-check.sh --tiny
	PYTHONPATH=$(IMAGE_VENV)/kit $(IMAGE_PY) -m pytest -q -n auto -m "not slow" $(PYTEST_ARGS)
endif

$(IMAGE_VENV)/.installed: requirements/image.txt
	rm -rf $(IMAGE_VENV)
	$(PYTHON312) -m venv $(IMAGE_VENV)
	$(IMAGE_PY) -m pip install -q --disable-pip-version-check -r requirements/image.txt
	touch $@

stats: setup
	$(PY) tools/model_stats.py --config configs/pythia-1.4b-4+8R2+4-mesh.yml

clean:
	rm -rf $(VENV) $(IMAGE_VENV) .whl build *.egg-info
