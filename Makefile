# The verbs a user types. `make run` and `make test` set everything up first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q

.PHONY: setup run test test-fast lint format bench images clean

setup: $(STAMP)

# torch/torchvision go in first and stay pinned (constraints.txt) for every later install,
# so no other package can pull a different (multi-GB) torch build.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -c constraints.txt torch torchvision
	$(PIP) -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

run: setup
	$(BIN)/drseg --config configs/local.yaml run

test: setup
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not integration"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The four container images (images/); needs a Docker engine with BuildKit.
images:
	images/build.sh

bench: setup
	$(BIN)/python bench/ingest_clahe.py

clean:
	rm -rf .drseg .pytest_cache .mypy_cache .ruff_cache
