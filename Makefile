# dyconv-repro: `make help` lists the targets.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# another torch build, e.g. for a CUDA version: make install TORCH_INDEX=<PyTorch wheel index URL>
TORCH_INDEX ?=
TORCH_PIP := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: help install test test-faults test-all lint train demo clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install:  ## create .venv and install the package (editable) with the dev and export extras
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIP) "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q $(TORCH_PIP) torch torchvision
	$(BIN)/pip install -q -e ".[dev,export]"
	$(BIN)/dyconv-native || echo "(optional) native kernels not built: the Python paths are used"

test:  ## fast test suite (what CI runs)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-faults:  ## the slow fault-injection suite (kills, signals, full disk, corrupt checkpoints, DDP): CI's slow tier
	$(BIN)/python -m pytest -q -n 2 -m slow tests/faults $(PYTEST_ARGS)

test-all:  ## fast + slow tests
	$(BIN)/python -m pytest -q -n 2 -m "slow or not slow" $(PYTEST_ARGS)

lint:  ## ruff
	$(BIN)/ruff check dyconv_repro tests scripts

train:  ## train with the defaults (CIFAR ResNet-20 on the offline digits data); ARGS="..." adds overrides
	$(BIN)/dyconv-train $(ARGS)

demo:  ## static conv + every operator on digits, then the comparison table (smoke scale)
	$(BIN)/python scripts/demo.py $(ARGS)

clean:  ## remove run outputs and caches
	rm -rf runs outputs multirun .pytest_cache
