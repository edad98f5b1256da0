# memfed: set-up and everyday commands. `make demo` and `make test` each install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed on its own, pinned, before the project, so no dependency's open range picks a newer
# (multi-GB CUDA) build. Where PyPI's default wheel is a CUDA build and you want the CPU one, run e.g.
# `make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"`.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install demo test lint proto bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/memfed demo

test: install lint
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

proto: install
	$(BIN)/python -m memfed.mip.codegen

bench: install
	$(BIN)/memfed bench store --json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
