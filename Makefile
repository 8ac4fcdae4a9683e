# ign-bench: every target installs what it needs first (a venv in .venv, built once per pyproject change).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SWEEP  ?= default

# glibc's allocator spends most of its time in the kernel on Inception-sized activations on CPU;
# these settings (see shared/notes/offline-inception.md) make CPU feature extraction 3x faster.
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 68719476736
export MALLOC_TOP_PAD_        := 1073741824

.PHONY: install test sweep report paper ui bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 import together (PyPI's torchvision does not import beside the CPU-only 2.13 wheel)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

sweep: install
	$(BIN)/ign-bench sweep $(SWEEP)

report: install
	$(BIN)/ign-bench report $(SWEEP)

paper: install
	$(BIN)/ign-bench paper

ui: install
	$(BIN)/ign-bench ui

bench: install
	$(BIN)/ign-bench bench

clean:
	rm -rf runs ray_results mlflow.db .cache
