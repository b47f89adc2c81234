# Two entry points: `make demo` (train a small MaP-DiT on Fashion-MNIST, sample, write a grid)
# and `make test` (the linter, then the test suite). Both set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo lint test

$(BIN)/mapdit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU build on this machine; the range in pyproject then adds nothing
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.4,<2.15"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/mapdit

setup: $(BIN)/mapdit

data:
	@test -f $(FMNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "could not install Fashion-MNIST: run 'apt-get install dataset-fashion-mnist' as root"

demo: setup data
	$(BIN)/mapdit demo

lint: setup
	$(BIN)/ruff check .

test: setup data lint
	$(BIN)/python -m pytest -q
